//! The API's route list (drover-api's crate doc) is the API document's, and so the router's
//! (both come from the same `#[utoipa::path]` handlers; `api/tests.rs` checks the router
//! answers every documented operation and nothing else).

use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];
/// Routes served outside `/v1` (Prometheus expects `/metrics`; the web console is at `/`).
const OUTSIDE_V1: [&str; 3] = ["/metrics", "/", "/ui/{file}"];

/// (METHOD, path) for every operation in the served OpenAPI document.
fn document_routes() -> BTreeSet<(String, String)> {
    let doc = serde_json::to_value(drover_host::api::openapi()).expect("the document serializes");
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths").iter() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// (METHOD, path) for every row of the route table in drover-api's crate doc.
fn documented_routes(src: &str) -> BTreeSet<(String, String)> {
    src.lines()
        .filter_map(|l| l.strip_prefix("//! | "))
        .filter_map(|row| {
            let mut cells = row.split(" | ");
            let method = cells.next()?.trim();
            let path = cells.next()?.trim().trim_matches('`');
            METHODS.contains(&method.to_lowercase().as_str()).then(|| {
                let path = path.split('?').next().unwrap_or(path);
                let full = if OUTSIDE_V1.contains(&path) {
                    path.to_string()
                } else {
                    format!("/v1{path}")
                };
                (method.to_string(), full)
            })
        })
        .collect()
}

#[test]
fn the_route_table_is_the_api_document() {
    let mut served = document_routes();
    // The web console's pages are served beside the API, outside its document.
    for page in drover_host::api::WEB_ROUTES {
        served.insert(("GET".to_string(), page.to_string()));
    }
    let docs = documented_routes(include_str!("../../drover-api/src/lib.rs"));
    assert!(served.len() > 40, "too few operations: {served:?}");
    let missing: Vec<_> = served.difference(&docs).collect();
    let stale: Vec<_> = docs.difference(&served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "drover-api's route table is out of date.\nserved, not listed: {missing:?}\nlisted, not served: {stale:?}"
    );
}

#[test]
fn every_operation_names_its_permission_and_its_errors() {
    let doc = serde_json::to_value(drover_host::api::openapi()).expect("the document serializes");
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let at = format!("{} {path}", m.to_uppercase());
            let responses = op["responses"].as_object().expect("responses");
            assert!(responses.contains_key("200"), "{at}: no 200");
            if path == "/v1/openapi.json" {
                assert!(op["x-drover-permission"].is_null(), "{at}");
                continue;
            }
            let perm = op["x-drover-permission"].as_str().unwrap_or("");
            assert!(!perm.is_empty(), "{at}: names no permission");
            assert!(
                op["x-drover-roles"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r == "admin")),
                "{at}: roles"
            );
            for status in ["401", "403", "429", "500"] {
                let r = &responses[status];
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ApiError",
                    "{at}: {status} is not an ApiError"
                );
            }
            if op.get("requestBody").is_some() {
                assert!(
                    responses.contains_key("413"),
                    "{at}: a body route without 413"
                );
            }
        }
    }
    // What the gate enforces is what the document says.
    assert_eq!(
        doc["paths"]["/v1/events"]["get"]["x-drover-permission"],
        "vm.read"
    );
    assert_eq!(
        doc["paths"]["/v1/events"]["get"]["x-drover-roles"],
        serde_json::json!(["admin", "operator", "viewer"])
    );
    assert_eq!(
        doc["paths"]["/v1/vms/{name}/exec"]["post"]["x-drover-permission"],
        "vm.exec"
    );
    assert_eq!(
        doc["paths"]["/v1/auth/tokens"]["post"]["x-drover-roles"],
        serde_json::json!(["admin"])
    );
}
