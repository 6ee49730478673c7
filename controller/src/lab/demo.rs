//! The built-in demo applied by `bulkhead lab up` without `-f`.

/// The demo's manifests: `examples/demo.yaml`, the same file the README points users to.
pub const DEMO_YAML: &str = include_str!("../../../examples/demo.yaml");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_documents, Kind};

    #[test]
    fn demo_parses() {
        let objects = parse_documents(DEMO_YAML, "demo.yaml").unwrap();
        assert_eq!(objects.iter().filter(|o| o.kind() == Kind::Namespace).count(), 4);
        assert_eq!(objects.iter().filter(|o| o.kind() == Kind::Pod).count(), 4);
        assert_eq!(objects.iter().filter(|o| o.kind() == Kind::NetworkPolicy).count(), 6);
    }
}
