//! `scripts/install-packages`, which `scripts/test` and
//! `scripts/container-test` install with: the policy-rc.d it puts in place
//! to keep package scripts from starting services goes again, on success
//! and on failure, and one that was there before is left alone. Runs the
//! real apt-get on packages already installed (no download) and on one that
//! does not exist; the policy file is pointed at a temporary path.

use std::path::{Path, PathBuf};
use std::process::Output;

/// Runs the script; its output, and whether the policy file was seen (and
/// refusing service starts) while it ran.
fn install_watched(policy: &Path, packages: &[&str]) -> (Output, bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-packages");
    let child = std::process::Command::new(script)
        .args(packages)
        .env("POLICY_RC_D", policy)
        .env("APT_UPDATE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/install-packages runs");
    let pid = child.id();
    let mut seen = false;
    // Until the script exits (its /proc entry turns into a zombie's).
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        seen |= std::fs::read_to_string(policy).is_ok_and(|p| p.contains("exit 101"));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (child.wait_with_output().unwrap(), seen)
}

fn install(policy: &Path, packages: &[&str]) -> Output {
    install_watched(policy, packages).0
}

fn policy_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("policy-rc.d")
}

#[test]
fn the_policy_file_goes_after_an_install_and_a_failed_one() {
    assert!(
        Path::new("/usr/bin/apt-get").exists(),
        "apt-get is missing: scripts/test runs on Debian and installs with it"
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_in(&dir);
    let (ok, seen) = install_watched(&policy, &["bash", "coreutils"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(seen, "no policy-rc.d refused service starts during the install");
    assert!(!policy.exists(), "the policy file it made is left behind");

    let bad = install(&policy, &["syncnode-no-such-package"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("install-packages: apt-get install syncnode-no-such-package failed"),
        "{err}"
    );
    assert!(
        !policy.exists(),
        "the policy file it made is left behind after a failure"
    );

    // One that was there before stays as it was.
    std::fs::write(&policy, "#!/bin/sh\nexit 0\n").unwrap();
    for packages in [&["bash"][..], &["syncnode-no-such-package"]] {
        let _ = install(&policy, packages);
        assert_eq!(std::fs::read_to_string(&policy).unwrap(), "#!/bin/sh\nexit 0\n");
    }
    let none = install(&policy, &[]);
    assert_eq!(none.status.code(), Some(2), "no package named is a usage error");
}
