//! Build-time inputs of `common`:
//! - `sqlx::migrate!` embeds ../migrations at compile time: rebuild when a migration changes;
//! - the git commit the binaries are built from, for the `turnstile_build_info` metric:
//!   `TURNSTILE_GIT_COMMIT` when set (e.g. by a build without the repository), else
//!   `git rev-parse --short=12 HEAD`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-env-changed=TURNSTILE_GIT_COMMIT");
    let git = Path::new("../.git");
    // Rebuilt when HEAD moves (a commit, a checkout), not on every build.
    for watched in ["HEAD", "refs/heads", "packed-refs"] {
        if git.join(watched).exists() {
            println!("cargo:rerun-if-changed=../.git/{watched}");
        }
    }
    let commit = std::env::var("TURNSTILE_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!("cargo:rustc-env=TURNSTILE_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".to_owned()));
}
