//! Minimal stand-in for `crate::model` (Brief B) so the lab builds before the model lands.
//!
//! TODO(merge): delete this file and `use crate::model` in `lab/mod.rs`; the lab only uses
//! `parse_documents`, `Object::{kind, namespace, name}`, `ObjectRef`, `Cluster::{apply,
//! delete, objects, to_yaml}`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// One Kubernetes object the lab understands.
#[derive(Clone, Debug, PartialEq)]
#[expect(clippy::large_enum_variant, reason = "stand-in mirrors Brief B's type")]
pub enum Object {
    /// A namespace.
    Namespace(Namespace),
    /// A pod.
    Pod(Pod),
    /// A network policy.
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    /// The object's namespace; `None` for a Namespace.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Object::Namespace(_) => None,
            Object::Pod(p) => p.metadata.namespace.as_deref(),
            Object::NetworkPolicy(p) => p.metadata.namespace.as_deref(),
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        let name = match self {
            Object::Namespace(o) => &o.metadata.name,
            Object::Pod(o) => &o.metadata.name,
            Object::NetworkPolicy(o) => &o.metadata.name,
        };
        name.as_deref().unwrap_or("")
    }
}

/// Names one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Kind.
    pub kind: String,
    /// Namespace, `None` for a Namespace.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

/// Why parsing failed.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: document {index}: {message}")]
pub struct ModelError {
    origin: String,
    index: usize,
    message: String,
}

/// Parses multi-document YAML into objects; any error rejects the whole text.
pub fn parse_documents(text: &str, origin: &str) -> Result<Vec<Object>, ModelError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let err = |message: String| ModelError {
            origin: origin.to_string(),
            index,
            message,
        };
        let value = serde_json::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let mut obj = match kind.as_str() {
            "Namespace" => Object::Namespace(
                serde_json::from_value(value).map_err(|e| err(format!("Namespace: {e}")))?,
            ),
            "Pod" => {
                Object::Pod(serde_json::from_value(value).map_err(|e| err(format!("Pod: {e}")))?)
            }
            "NetworkPolicy" => Object::NetworkPolicy(
                serde_json::from_value(value).map_err(|e| err(format!("NetworkPolicy: {e}")))?,
            ),
            other => return Err(err(format!("unknown kind \"{other}\""))),
        };
        if obj.name().is_empty() {
            return Err(err(format!("{kind}: metadata.name: required")));
        }
        match &mut obj {
            Object::Pod(p) if p.metadata.namespace.is_none() => {
                p.metadata.namespace = Some("default".into())
            }
            Object::NetworkPolicy(p) => {
                if p.metadata.namespace.is_none() {
                    p.metadata.namespace = Some("default".into());
                }
                let spec = p.spec.clone().unwrap_or_default();
                for (r, rule) in spec.ingress.unwrap_or_default().iter().enumerate() {
                    for (f, peer) in rule.from.clone().unwrap_or_default().iter().enumerate() {
                        for (s, sel) in [
                            ("podSelector", &peer.pod_selector),
                            ("namespaceSelector", &peer.namespace_selector),
                        ] {
                            for (e, expr) in sel
                                .as_ref()
                                .and_then(|s| s.match_expressions.clone())
                                .unwrap_or_default()
                                .iter()
                                .enumerate()
                            {
                                if !["In", "NotIn", "Exists", "DoesNotExist"]
                                    .contains(&expr.operator.as_str())
                                {
                                    return Err(err(format!(
                                        "NetworkPolicy {}/{}: spec.ingress[{r}].from[{f}].{s}.matchExpressions[{e}].operator: unknown operator \"{}\"",
                                        p.metadata.namespace.as_deref().unwrap_or(""),
                                        p.metadata.name.as_deref().unwrap_or(""),
                                        expr.operator
                                    )));
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        out.push(obj);
    }
    Ok(out)
}

/// The whole model.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    objects: BTreeMap<(u8, String, String), Object>,
}

fn key(kind: &str, namespace: Option<&str>, name: &str) -> (u8, String, String) {
    let order = match kind {
        "Namespace" => 0,
        "Pod" => 1,
        _ => 2,
    };
    (order, namespace.unwrap_or("").to_string(), name.to_string())
}

impl Cluster {
    /// Inserts or replaces an object; creates a missing namespace.
    pub fn apply(&mut self, object: Object) {
        if let Some(ns) = object.namespace() {
            let k = key("Namespace", None, ns);
            if !self.objects.contains_key(&k) {
                let mut n = Namespace::default();
                n.metadata.name = Some(ns.to_string());
                self.apply(Object::Namespace(n));
            }
        }
        let mut object = object;
        if let Object::Namespace(n) = &mut object {
            let name = n.metadata.name.clone().unwrap_or_default();
            n.metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert("kubernetes.io/metadata.name".into(), name);
        }
        self.objects.insert(
            key(object.kind(), object.namespace(), object.name()),
            object,
        );
    }

    /// Deletes an object; a namespace takes its pods and policies with it.
    pub fn delete(&mut self, r: &ObjectRef) {
        if r.kind == "Namespace" {
            self.objects
                .retain(|_, o| o.namespace() != Some(r.name.as_str()));
        }
        self.objects
            .remove(&key(&r.kind, r.namespace.as_deref(), &r.name));
    }

    /// Every object, namespaces first.
    pub fn objects(&self) -> Vec<Object> {
        self.objects.values().cloned().collect()
    }

    /// The model as multi-document YAML.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for o in self.objects.values() {
            let text = match o {
                Object::Namespace(x) => serde_yaml_ng::to_string(&with_kind(x, "v1", "Namespace")),
                Object::Pod(x) => serde_yaml_ng::to_string(&with_kind(x, "v1", "Pod")),
                Object::NetworkPolicy(x) => {
                    serde_yaml_ng::to_string(&with_kind(x, "networking.k8s.io/v1", "NetworkPolicy"))
                }
            };
            out.push_str("---\n");
            out.push_str(&text.unwrap_or_default());
        }
        out
    }
}

fn with_kind<T: serde::Serialize>(x: &T, api: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(x).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), api.into());
        m.insert("kind".into(), kind.into());
    }
    v
}
