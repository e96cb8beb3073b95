//! Checks a JSON answer against the API document's schema for it, for tests (the unit tests
//! here and the e2e suite, which includes this file).
//!
//! Every object schema with `properties` is closed first (`unevaluatedProperties: false`), so
//! a field the answer has and the document lacks fails as much as a required field it lacks:
//! a field renamed in a type but not in the document (or the other way round) cannot pass.
//! (Schemas that are parts of an `allOf`, i.e. `#[serde(flatten)]`, stay open; their whole is
//! closed.)

use serde_json::{json, Value};

/// The schema of the answer `status` of `METHOD route` (a path as the document spells it).
pub fn schema_for(doc: &Value, method: &str, route: &str, status: u16) -> Result<Value, String> {
    let op = &doc["paths"][route][method.to_lowercase()];
    if op.is_null() {
        return Err(format!("the document has no {method} {route}"));
    }
    let resp = &op["responses"][status.to_string()];
    let content = resp["content"]
        .as_object()
        .ok_or_else(|| format!("{method} {route}: the document has no answer {status}"))?;
    content
        .values()
        .next()
        .map(|c| c["schema"].clone())
        .ok_or_else(|| format!("{method} {route} {status}: no schema"))
}

/// Validate `answer` as the answer `status` of `METHOD route`.
pub fn validate(
    doc: &Value,
    method: &str,
    route: &str,
    status: u16,
    answer: &Value,
) -> Result<(), String> {
    let schema = schema_for(doc, method, route, status)?;
    validate_against(doc, schema, answer)
}

/// Validate `answer` against the component schema `name`.
pub fn validate_schema(doc: &Value, name: &str, answer: &Value) -> Result<(), String> {
    validate_against(
        doc,
        json!({ "$ref": format!("#/components/schemas/{name}") }),
        answer,
    )
}

fn validate_against(doc: &Value, schema: Value, answer: &Value) -> Result<(), String> {
    let mut components = doc["components"].clone();
    close(&mut components, false);
    let mut schema = schema;
    close(&mut schema, false);
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": components,
        "allOf": [schema],
    });
    let v = jsonschema::draft202012::new(&root).map_err(|e| format!("the schema: {e}"))?;
    let errors: Vec<String> = v
        .iter_errors(answer)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} in {answer}", errors.join("; ")))
    }
}

/// Close every object schema under `v` (see the module docs).
fn close(v: &mut Value, part_of_all_of: bool) {
    match v {
        Value::Object(o) => {
            let is_object_schema = o.contains_key("properties") || o.contains_key("allOf");
            if is_object_schema && !part_of_all_of && !o.contains_key("additionalProperties") {
                o.insert("unevaluatedProperties".into(), Value::Bool(false));
            }
            for (k, child) in o.iter_mut() {
                // A property named like a keyword is a property, not a keyword.
                close(child, k == "allOf");
            }
        }
        Value::Array(a) => {
            for child in a {
                close(child, part_of_all_of);
            }
        }
        _ => {}
    }
}
