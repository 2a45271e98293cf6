//! `iptrace --json` output read back: every line parsed with serde and validated against the
//! schema file, docs/iptrace.schema.json.

use serde_json::Value;

const SCHEMA: &str = include_str!("../../docs/iptrace.schema.json");

/// The schema, compiled; formats (addresses, date-time) are checked too.
pub fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema file is JSON");
    jsonschema::options().should_validate_formats(true).build(&schema).expect("the schema is a JSON Schema")
}

/// Where `record` breaks the schema, one line each; empty when it conforms.
pub fn schema_errors(validator: &jsonschema::Validator, record: &Value) -> Vec<String> {
    validator.iter_errors(record).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// Every line parsed with serde and validated against the schema; panics naming the first that
/// is not JSON or breaks the schema.
pub fn records(output: &str) -> Vec<Value> {
    let validator = validator();
    output
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}):\n{line}"));
            let errors = schema_errors(&validator, &record);
            assert!(errors.is_empty(), "{line}\nbreaks the schema:\n{}", errors.join("\n"));
            record
        })
        .collect()
}

/// The stats record `--stats --json` writes on stderr: the one JSON line there, valid.
pub fn stats(stderr: &str) -> Value {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "one JSON line on stderr:\n{stderr}");
    let record = records(lines[0]).remove(0);
    assert!(record["stats"].is_object(), "{record}");
    record
}
