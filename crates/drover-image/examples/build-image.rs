//! Builds (or loads from cache) the guest image from the command line:
//! `cargo run --release -p drover-image --example build-image -- CACHE_DIR AGENT_BINARY [--force] [--kernel PKG]`
//! Progress goes to stderr, the manifest and paths as JSON to stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(cache), Some(agent)) = (args.next(), args.next()) else {
        eprintln!("usage: build-image CACHE_DIR AGENT_BINARY [--force] [--kernel PKG]");
        return ExitCode::from(2);
    };
    let mut spec = drover_image::ImageSpec::new(PathBuf::from(cache), PathBuf::from(agent));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--force" => spec.force = true,
            "--kernel" => spec.kernel_package = args.next(),
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    let t = Instant::now();
    let res = drover_image::build(&spec, &mut |p| {
        eprintln!(
            "[{:>7.3}s] {}",
            t.elapsed().as_secs_f64(),
            serde_json::to_string(&p).unwrap_or_default()
        )
    });
    match res {
        Ok(img) => {
            let out = serde_json::json!({
                "dir": img.dir, "kernel": img.kernel, "initrd": img.initrd,
                "elapsed_ms": t.elapsed().as_millis() as u64, "manifest": img.manifest,
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
