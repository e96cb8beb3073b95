//! Every HTTP request body droverd's API takes, as the API parses it (JSON; an empty body reads
//! as `{}`): whatever a caller sends, parsing and validation never panic. The first byte picks
//! the body type, the rest is the body.
#![no_main]

use drover_api as api;
use libfuzzer_sys::fuzz_target;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    let body = if body.is_empty() { b"{}" as &[u8] } else { body };
    serde_json::from_slice(body).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 18 {
        0 => {
            if let Some(spec) = parse::<drover_model::VmSpec>(body) {
                let _ = spec.validate();
            }
        }
        1 => drop(parse::<api::StartRequest>(body)),
        2 => drop(parse::<api::StopRequest>(body)),
        3 => {
            if let Some(r) = parse::<api::AttachRequest>(body) {
                for f in &r.forward {
                    let _ = f.parse::<drover_model::PortForward>();
                }
                if let Some(s) = &r.size {
                    let _ = drover_model::parse_size(s);
                }
            }
        }
        4 => drop(parse::<api::DetachRequest>(body)),
        5 => drop(parse::<api::SetRequest>(body)),
        6 => drop(parse::<api::PromoteRequest>(body)),
        7 => drop(parse::<api::PersistRequest>(body)),
        8 => drop(parse::<api::GuestGrantRequest>(body)),
        9 => drop(parse::<api::SnapshotRequest>(body)),
        10 => drop(parse::<api::RestoreRequest>(body)),
        11 => drop(parse::<drover_host::api::GrantRequest>(body)),
        12 => drop(parse::<api::TokenCreateRequest>(body)),
        13 => drop(parse::<api::ExecRequest>(body)),
        14 => drop(parse::<api::ImageBuildRequest>(body)),
        15 => drop(parse::<api::MigrateRequest>(body)),
        16 => drop(parse::<api::IncomingRequest>(body)),
        _ => drop(parse::<api::MigrationStep>(body)),
    }
});
