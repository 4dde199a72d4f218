//! How values are named in error messages: a JSON value by its kind ("a string"), a TOML value
//! with its content ("the integer 3"). Shared by the NDJSON parser, the TOML layer and the plugin
//! manifests, so that one wording reaches the user whichever layer found the problem.

use serde_json::Value;

/// How a JSON value is named in error messages ("a string").
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How a TOML value is named in error messages ("the integer 3").
pub(crate) fn describe_toml(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(f) => format!("the float {f}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the datetime {d}"),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}
