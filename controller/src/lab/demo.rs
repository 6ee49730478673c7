//! The built-in demo applied by `bulkhead lab up` without `-f` (a copy is `examples/demo.yaml`).

/// The demo's manifests.
pub const DEMO_YAML: &str = include_str!("demo.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_parses_and_matches_the_example() {
        let objects = super::super::model::parse_documents(DEMO_YAML, "demo.yaml").unwrap();
        assert_eq!(objects.iter().filter(|o| o.kind() == crate::model::Kind::Pod).count(), 4);
        assert_eq!(objects.iter().filter(|o| o.kind() == crate::model::Kind::NetworkPolicy).count(), 6);
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo.yaml")).unwrap();
        assert_eq!(
            example, DEMO_YAML,
            "examples/demo.yaml must stay a copy of controller/src/lab/demo.yaml"
        );
    }
}
