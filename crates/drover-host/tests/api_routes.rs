//! The API's route list (drover-api's crate doc) is the router's: every route the router
//! serves is listed with its method, and every listed route is served.

use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];
/// Routes served outside `/v1` (Prometheus expects `/metrics`; the web console is at `/`).
const OUTSIDE_V1: [&str; 3] = ["/metrics", "/", "/ui/{file}"];

/// (METHOD, path) for every `.route(path, method(handler)...)` in the router's source.
fn router_routes(src: &str) -> BTreeSet<(String, String)> {
    let start = src
        .find("Router::new()")
        .expect("the router is built in api.rs");
    let end = src[start..]
        .find(".fallback(")
        .expect("the router has a fallback")
        + start;
    let body = &src[start..end];
    let mut out = BTreeSet::new();
    for part in body.split(".route(").skip(1) {
        let path = part.split('"').nth(1).expect("a route's path is a literal");
        // The method routers up to the end of this .route(...) call.
        let rest = &part[part.find(path).unwrap_or(0) + path.len()..];
        for word in rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '(')) {
            for m in METHODS {
                if word.starts_with(&format!("{m}(")) {
                    out.insert((m.to_uppercase(), path.to_string()));
                }
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
fn the_documented_route_list_is_the_router() {
    let router = router_routes(include_str!("../src/api.rs"));
    let docs = documented_routes(include_str!("../../drover-api/src/lib.rs"));
    assert!(
        router.len() > 30,
        "the parser found too few routes: {router:?}"
    );
    let missing: Vec<_> = router.difference(&docs).collect();
    let stale: Vec<_> = docs.difference(&router).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "drover-api's route table is out of date.\nserved, not listed: {missing:?}\nlisted, not served: {stale:?}"
    );
}
