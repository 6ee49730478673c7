//! Kubernetes `LabelSelector` matching and the API server's label syntax checks.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A validation failure at one field of an object, e.g. `spec.podSelector.matchLabels`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the offending field, in the API's camelCase spelling.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// Builds a field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The selector operators the API accepts.
const OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Whether `labels` satisfy `sel`: every matchLabels pair and every matchExpression.
///
/// An empty selector matches everything. An operator the API would reject matches nothing,
/// so an unvalidated selector fails closed.
pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|req| {
            let values = req.values.as_deref().unwrap_or_default();
            let value = labels.get(&req.key);
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Checks a selector as the API server does; `path` names the selector in errors.
pub fn validate(sel: &LabelSelector, path: &str) -> Result<(), FieldError> {
    if let Some(ml) = &sel.match_labels {
        validate_labels(ml, &format!("{path}.matchLabels"))?;
    }
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{i}]");
        validate_label_key(&req.key).map_err(|m| FieldError::new(format!("{at}.key"), m))?;
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        format!("must be non-empty when operator is {}", req.operator),
                    ));
                }
                for (j, v) in values.iter().enumerate() {
                    validate_label_value(v).map_err(|m| FieldError::new(format!("{at}.values[{j}]"), m))?;
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        format!("must be empty when operator is {}", req.operator),
                    ));
                }
            }
            other => {
                return Err(FieldError::new(
                    format!("{at}.operator"),
                    format!("unknown operator {other:?} (expected {})", expected_operators()),
                ));
            }
        }
    }
    Ok(())
}

fn expected_operators() -> String {
    let (last, rest) = OPERATORS.split_last().unwrap_or((&"", &[]));
    format!("{} or {last}", rest.join(", "))
}

/// Checks every key and value of a label map; `path` names the map in errors.
pub fn validate_labels(labels: &BTreeMap<String, String>, path: &str) -> Result<(), FieldError> {
    for (k, v) in labels {
        validate_label_key(k).map_err(|m| FieldError::new(path, format!("key {k:?}: {m}")))?;
        validate_label_value(v).map_err(|m| FieldError::new(path, format!("value {v:?} of key {k:?}: {m}")))?;
    }
    Ok(())
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric).
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return Err("prefix must be a DNS subdomain of 1 to 253 characters".into());
        }
        let ok = p.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
        if !ok {
            return Err(format!("prefix {p:?} is not a lowercase DNS subdomain"));
        }
    }
    if name.is_empty() {
        return Err("name part must not be empty".into());
    }
    check_name(name)
}

/// Checks a label value: empty, or a name of at most 63 characters as in a key.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value)
}

fn check_name(name: &str) -> Result<(), String> {
    if name.len() > 63 {
        return Err(format!("{name:?} is longer than 63 characters"));
    }
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let bytes = name.as_bytes();
    let edges_ok = bytes.first().copied().is_some_and(alnum) && bytes.last().copied().is_some_and(alnum);
    let body_ok = bytes.iter().all(|&b| alnum(b) || b == b'-' || b == b'_' || b == b'.');
    if edges_ok && body_ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn sel(ml: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: if ml.is_empty() { None } else { Some(labels(ml)) },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }

    #[test]
    fn operators_match_as_the_api_documents() {
        let pod_a = labels(&[("pod", "a"), ("tier", "web")]);
        let cases: Vec<(&str, LabelSelector, bool)> = vec![
            ("empty selects all", sel(&[], vec![]), true),
            ("matchLabels hit", sel(&[("pod", "a")], vec![]), true),
            ("matchLabels miss", sel(&[("pod", "b")], vec![]), false),
            ("matchLabels all must hold", sel(&[("pod", "a"), ("tier", "db")], vec![]), false),
            ("In hit", sel(&[], vec![expr("pod", "In", &["a", "b"])]), true),
            ("In miss", sel(&[], vec![expr("pod", "In", &["b"])]), false),
            ("In absent key", sel(&[], vec![expr("x", "In", &["a"])]), false),
            ("NotIn hit", sel(&[], vec![expr("pod", "NotIn", &["b"])]), true),
            ("NotIn miss", sel(&[], vec![expr("pod", "NotIn", &["a"])]), false),
            ("NotIn absent key is true", sel(&[], vec![expr("x", "NotIn", &["a"])]), true),
            ("Exists", sel(&[], vec![expr("tier", "Exists", &[])]), true),
            ("Exists absent", sel(&[], vec![expr("x", "Exists", &[])]), false),
            ("DoesNotExist", sel(&[], vec![expr("x", "DoesNotExist", &[])]), true),
            ("DoesNotExist present", sel(&[], vec![expr("pod", "DoesNotExist", &[])]), false),
            (
                "labels AND expressions",
                sel(&[("pod", "a")], vec![expr("tier", "In", &["db"])]),
                false,
            ),
            ("unknown operator fails closed", sel(&[], vec![expr("pod", "Foo", &["a"])]), false),
        ];
        for (name, s, want) in cases {
            assert_eq!(matches(&s, &pod_a), want, "{name}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(LabelSelector, Option<&str>)> = vec![
            (sel(&[("pod", "a")], vec![expr("k", "In", &["v"])]), None),
            (
                sel(&[], vec![expr("k", "Foo", &["v"])]),
                Some("s.matchExpressions[0].operator: unknown operator \"Foo\" (expected In, NotIn, Exists or DoesNotExist)"),
            ),
            (
                sel(&[], vec![expr("k", "In", &[])]),
                Some("s.matchExpressions[0].values: must be non-empty"),
            ),
            (
                sel(&[], vec![expr("k", "NotIn", &[])]),
                Some("s.matchExpressions[0].values: must be non-empty"),
            ),
            (
                sel(&[], vec![expr("k", "Exists", &["v"])]),
                Some("s.matchExpressions[0].values: must be empty"),
            ),
            (
                sel(&[], vec![expr("k", "DoesNotExist", &["v"])]),
                Some("s.matchExpressions[0].values: must be empty"),
            ),
            (sel(&[], vec![expr("bad key!", "Exists", &[])]), Some("s.matchExpressions[0].key:")),
            (sel(&[], vec![expr("k", "In", &["-bad"])]), Some("s.matchExpressions[0].values[0]:")),
            (sel(&[("a/b/c", "v")], vec![]), Some("s.matchLabels: key \"a/b/c\"")),
            (sel(&[("k", "v v")], vec![]), Some("s.matchLabels: value \"v v\"")),
        ];
        for (s, want) in cases {
            let got = validate(&s, "s");
            match want {
                None => assert_eq!(got, Ok(())),
                Some(prefix) => {
                    let msg = got.expect_err(prefix).to_string();
                    assert!(msg.starts_with(prefix), "{msg:?} does not start with {prefix:?}");
                }
            }
        }
    }

    #[test]
    fn label_key_and_value_syntax() {
        for ok in ["app", "app.kubernetes.io/name", "kubernetes.io/metadata.name", "a_b.c-d", "A1"] {
            assert_eq!(validate_label_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/x", "Upper.Case/x", "x/", "-x", "x-", &"a".repeat(64), "a/b/c", "sp ace"] {
            assert!(validate_label_key(bad).is_err(), "{bad:?}");
        }
        for ok in ["", "v", "v-1.2_3", &"a".repeat(63)] {
            assert_eq!(validate_label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["-v", "v-", "a/b", &"a".repeat(64)] {
            assert!(validate_label_value(bad).is_err(), "{bad:?}");
        }
    }
}
