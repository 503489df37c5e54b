//! `make deb` for real: the package is built, installed on this machine with
//! `dpkg -i`, its unit checked by `systemd-analyze verify`, its programs run
//! from where it put them, reinstalled over an edited environment file
//! (kept), removed (the environment file stays, a conffile) and purged
//! (nothing of it stays). Needs root, dpkg, dpkg-dev, cargo-deb, man and
//! systemd-analyze.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

const ENV_FILE: &str = "/etc/xtcp/xtcp.env";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Purges the package whatever happens to the test.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "xtcp"]);
    }
}

#[test]
fn the_package_installs_runs_keeps_its_conffile_and_purges_clean() {
    if !can_run(&[
        Need::Root,
        Need::Tool("dpkg"),
        Need::Tool("cargo-deb"),
        Need::Tool("dpkg-shlibdeps"),
        Need::Tool("man"),
        Need::Tool("systemd-analyze"),
    ]) {
        return;
    }
    let _serial = serial();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let made = Command::new("make")
        .arg("deb")
        .current_dir(repo)
        .output()
        .unwrap();
    let said = succeeded(made, "make deb");
    let deb: PathBuf = said
        .lines()
        .rev()
        .find(|l| l.ends_with(".deb"))
        .map(|l| repo.join(l.trim()))
        .unwrap_or_else(|| panic!("no .deb named: {said}"));
    assert!(
        !Path::new("/usr/bin/xtcp").exists(),
        "xtcp already installed here"
    );

    let _installed = Installed;
    succeeded(run("dpkg", &["-i", deb.to_str().unwrap()]), "dpkg -i");
    let files: Vec<String> = succeeded(run("dpkg", &["-L", "xtcp"]), "dpkg -L")
        .lines()
        .filter(|l| !Path::new(l).is_dir())
        .map(str::to_string)
        .collect();
    for file in [
        "/usr/bin/xtcp",
        "/usr/bin/xtcp-forwarder",
        "/usr/bin/xtcp-debug-server",
        "/usr/bin/xtcp-top",
        "/lib/systemd/system/xtcp.service",
        "/lib/systemd/system/xtcp-forwarder.service",
        "/lib/systemd/system/xtcp-forwarder.socket",
        "/lib/systemd/system/xtcp-forwarder.service.d/spool.conf",
        "/etc/xtcp/forwarder.env",
        ENV_FILE,
        "/usr/share/doc/xtcp/netns.conf",
        "/usr/share/xtcp/prometheus/xtcp-alerts.yml",
        "/usr/share/xtcp/prometheus/xtcp-alerts.test.yml",
        "/usr/share/xtcp/grafana/xtcp-services.json",
        "/usr/share/man/man1/xtcp.1.gz",
        "/usr/share/bash-completion/completions/xtcp",
    ] {
        assert!(files.iter().any(|f| f == file), "{file} not in {files:?}");
    }
    let conffiles = succeeded(
        run("dpkg-query", &["-W", "-f=${Conffiles}", "xtcp"]),
        "conffiles",
    );
    assert!(conffiles.contains(ENV_FILE), "{conffiles}");
    assert!(conffiles.contains("/etc/xtcp/forwarder.env"), "{conffiles}");
    succeeded(
        run(
            "systemd-analyze",
            &[
                "verify",
                "/lib/systemd/system/xtcp.service",
                "/lib/systemd/system/xtcp-forwarder.service",
                "/lib/systemd/system/xtcp-forwarder.socket",
            ],
        ),
        "systemd-analyze verify",
    );
    let version = succeeded(run("/usr/bin/xtcp", &["--version"]), "xtcp --version");
    assert_eq!(
        version.trim(),
        format!("xtcp {}", env!("CARGO_PKG_VERSION"))
    );
    // The installed one-shot, on this host's own sockets.
    let once = run(
        "/usr/bin/xtcp",
        &["--once", "--states", "listen", "--format", "text"],
    );
    assert_eq!(
        once.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let man = succeeded(run("man", &["-w", "xtcp-forwarder"]), "man -w");
    assert_eq!(man.trim(), "/usr/share/man/man1/xtcp-forwarder.1.gz");

    // An upgrade (here the same version again) keeps an edited env file.
    let edited = format!(
        "{}XTCP_FREQUENCY=1m\n",
        std::fs::read_to_string(ENV_FILE).unwrap()
    );
    std::fs::write(ENV_FILE, &edited).unwrap();
    succeeded(
        run("dpkg", &["-i", "--force-confold", deb.to_str().unwrap()]),
        "dpkg -i again",
    );
    assert_eq!(std::fs::read_to_string(ENV_FILE).unwrap(), edited);

    // Removed: the programs go, the edited conffile stays.
    succeeded(run("dpkg", &["-r", "xtcp"]), "dpkg -r");
    assert!(!Path::new("/usr/bin/xtcp").exists());
    assert_eq!(std::fs::read_to_string(ENV_FILE).unwrap(), edited);
    // Purged: nothing of the package stays.
    succeeded(run("dpkg", &["--purge", "xtcp"]), "dpkg --purge");
    let left: Vec<&String> = files.iter().filter(|f| Path::new(f).exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new("/etc/xtcp").exists());
    assert!(!run("dpkg", &["-s", "xtcp"]).status.success());
}
