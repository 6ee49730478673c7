//! `namespace/name` references to Kubernetes objects.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A namespaced object, e.g. a pod or a NetworkPolicy; written `namespace/name`.
///
/// Serialized as `{"namespace":…,"name":…}`; fields that are one `namespace/name` string
/// use [`text`] or [`opt_text`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamespacedName {
    /// The namespace.
    pub namespace: String,
    /// The name in the namespace.
    pub name: String,
}

impl NamespacedName {
    /// `namespace`/`name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Text that is not `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not NAMESPACE/NAME")]
pub struct ParseNameError(pub String);

impl FromStr for NamespacedName {
    type Err = ParseNameError;

    /// Both parts non-empty, exactly one slash.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(NamespacedName::new(ns, name)),
            _ => Err(ParseNameError(text.to_string())),
        }
    }
}

/// Serde for a [`NamespacedName`] field written as one `namespace/name` string
/// (`#[serde(with = "name::text")]`).
pub mod text {
    use super::NamespacedName;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `namespace/name`.
    pub fn serialize<S: Serializer>(n: &NamespacedName, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    /// Reads `namespace/name`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NamespacedName, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Serde for an optional [`NamespacedName`] field written as one `namespace/name` string.
pub mod opt_text {
    use super::NamespacedName;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `namespace/name`, or nothing.
    pub fn serialize<S: Serializer>(n: &Option<NamespacedName>, s: S) -> Result<S::Ok, S::Error> {
        match n {
            Some(n) => s.collect_str(n),
            None => s.serialize_none(),
        }
    }

    /// Reads `namespace/name`, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NamespacedName>, D::Error> {
        Option::<std::borrow::Cow<str>>::deserialize(d)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_namespace_slash_name() {
        let n: NamespacedName = "x/a".parse().unwrap();
        assert_eq!(n, NamespacedName::new("x", "a"));
        assert_eq!(n.to_string(), "x/a");
        assert_eq!(serde_json::to_string(&n).unwrap(), r#"{"namespace":"x","name":"a"}"#);
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Text {
            #[serde(with = "text")]
            pod: NamespacedName,
            #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
            policy: Option<NamespacedName>,
        }
        let t = Text {
            pod: n.clone(),
            policy: None,
        };
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"pod":"x/a"}"#);
        assert_eq!(serde_json::from_str::<Text>(r#"{"pod":"x/a"}"#).unwrap(), t);
        let t = Text {
            pod: n.clone(),
            policy: Some(n.clone()),
        };
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"pod":"x/a","policy":"x/a"}"#);
        assert_eq!(serde_json::from_str::<Text>(r#"{"pod":"x/a","policy":"x/a"}"#).unwrap(), t);
        assert!(serde_json::from_str::<Text>(r#"{"pod":"xa"}"#).is_err());
        for bad in ["xa", "/a", "x/", "x/a/b", ""] {
            let e = bad.parse::<NamespacedName>().unwrap_err();
            assert!(e.to_string().contains("NAMESPACE/NAME"), "{bad:?}: {e}");
        }
    }
}
