//! IP protocols as users and the wire name them.

use std::fmt;
use std::str::FromStr;

use bulkhead_common::proto;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IP protocol: `TCP`, `UDP`, `SCTP`, `ICMP` or any other number.
///
/// One number per protocol, so `Protocol::from_number(6) == Protocol::TCP`. On the wire and
/// in `observe -o json` it is the name (`"TCP"`), the number for others (`"47"`), and
/// `"non-IPv4"` for 0, which the datapath reports for packets that are not IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Protocol(u8);

impl Protocol {
    /// TCP.
    pub const TCP: Protocol = Protocol(proto::TCP);
    /// UDP.
    pub const UDP: Protocol = Protocol(proto::UDP);
    /// SCTP.
    pub const SCTP: Protocol = Protocol(proto::SCTP);
    /// ICMP.
    pub const ICMP: Protocol = Protocol(proto::ICMP);
    /// What the datapath reports for a packet that is not IPv4.
    pub const NON_IPV4: Protocol = Protocol(0);
    /// The protocols with a name, in the order flags list them.
    pub const NAMED: [Protocol; 4] = [Protocol::TCP, Protocol::UDP, Protocol::SCTP, Protocol::ICMP];

    /// The protocol with IP protocol number `n`.
    pub const fn from_number(n: u8) -> Self {
        Protocol(n)
    }

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        self.0
    }

    /// The name, when the protocol has one (`TCP`, `UDP`, `SCTP`, `ICMP`).
    pub const fn name(self) -> Option<&'static str> {
        match self.0 {
            proto::TCP => Some("TCP"),
            proto::UDP => Some("UDP"),
            proto::SCTP => Some("SCTP"),
            proto::ICMP => Some("ICMP"),
            _ => None,
        }
    }
}

impl From<u8> for Protocol {
    fn from(n: u8) -> Self {
        Protocol(n)
    }
}

impl From<Protocol> for u8 {
    fn from(p: Protocol) -> Self {
        p.0
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self.0) {
            (Some(name), _) => f.write_str(name),
            (None, 0) => f.write_str("non-IPv4"),
            (None, n) => write!(f, "{n}"),
        }
    }
}

/// A protocol name that is neither known nor a number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (expected TCP, UDP, SCTP, ICMP or a protocol number)")]
pub struct ParseProtocolError(pub String);

impl FromStr for Protocol {
    type Err = ParseProtocolError;

    /// A name in any case, `non-IPv4`, or a number 0-255.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(p) = Protocol::NAMED
            .into_iter()
            .find(|p| p.name().is_some_and(|n| n.eq_ignore_ascii_case(text)))
        {
            return Ok(p);
        }
        if text.eq_ignore_ascii_case("non-IPv4") {
            return Ok(Protocol::NON_IPV4);
        }
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = text.parse::<u8>() {
                return Ok(Protocol(n));
            }
        }
        Err(ParseProtocolError(text.to_string()))
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "clap")]
impl clap::ValueEnum for Protocol {
    fn value_variants<'a>() -> &'a [Self] {
        &Protocol::NAMED
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let lower = match *self {
            Protocol::TCP => "tcp",
            Protocol::UDP => "udp",
            Protocol::SCTP => "sctp",
            Protocol::ICMP => "icmp",
            _ => return None,
        };
        Some(clap::builder::PossibleValue::new(self.name()?).alias(lower))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for (text, p, n) in [
            ("TCP", Protocol::TCP, 6),
            ("UDP", Protocol::UDP, 17),
            ("SCTP", Protocol::SCTP, 132),
            ("ICMP", Protocol::ICMP, 1),
            ("47", Protocol::from_number(47), 47),
            ("non-IPv4", Protocol::NON_IPV4, 0),
        ] {
            assert_eq!(p.to_string(), text);
            assert_eq!(text.parse::<Protocol>().unwrap(), p);
            assert_eq!(p.number(), n);
            assert_eq!(Protocol::from(n), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Protocol>(&format!("\"{text}\"")).unwrap(), p);
        }
        assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::TCP);
        assert_eq!("Sctp".parse::<Protocol>().unwrap(), Protocol::SCTP);
        assert_eq!("6".parse::<Protocol>().unwrap(), Protocol::TCP);
        for bad in ["", "tcpx", "256", "-1", "+6"] {
            let e = bad.parse::<Protocol>().unwrap_err();
            assert!(e.to_string().contains("unknown protocol"), "{bad:?}: {e}");
        }
        assert!(serde_json::from_str::<Protocol>("\"gre\"").is_err());
    }
}
