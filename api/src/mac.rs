//! MAC addresses as Bulkhead writes them: lowercase `aa:bb:cc:dd:ee:ff`.

pub use macaddr::MacAddr6;

/// `aa:bb:cc:dd:ee:ff`, lowercase as CNI results and the registry have always had it
/// (`MacAddr6`'s `Display` is uppercase). The one place that lowercases a MAC.
pub fn to_text(mac: MacAddr6) -> String {
    mac.to_string().to_ascii_lowercase()
}

/// Serde for a [`MacAddr6`] field written as [`to_text`] (`#[serde(with = "mac::text")]`);
/// reads either case. (macaddr's own serde feature writes a byte array, not the string
/// existing registries and clients hold.)
pub mod text {
    use super::MacAddr6;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `aa:bb:cc:dd:ee:ff`.
    pub fn serialize<S: Serializer>(mac: &MacAddr6, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_text(*mac))
    }

    /// Reads a MAC in either case.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MacAddr6, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format_args!("malformed mac {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_read_either_case_and_write_lowercase() {
        let want = MacAddr6::new(0xaa, 0x0b, 0, 1, 2, 0xff);
        for text in ["aa:0b:00:01:02:ff", "AA:0B:00:01:02:FF"] {
            assert_eq!(text.parse::<MacAddr6>().unwrap(), want, "{text}");
        }
        assert_eq!(to_text(want), "aa:0b:00:01:02:ff");
        for bad in ["aa:0b:00:01:02", "aa:0b:00:01:02:ff:00", "zz:0b:00:01:02:ff", ""] {
            assert!(bad.parse::<MacAddr6>().is_err(), "{bad}");
        }
    }
}
