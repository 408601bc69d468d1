//! Checks on a binary seen from outside.

use std::{
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use crate::servers::signal;

/// Runs `binary --help` and asserts that it lists each `(flag, env)` of `expected` and that
/// every long option (`-h, --help` and `-V, --version` aside) names its environment variable.
pub fn assert_help_names_env_vars(binary: &str, expected: &[(&str, &str)]) {
    let out = Command::new(binary)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8");
    for (flag, env) in expected {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} missing from --help"
        );
    }
    let options = help
        .lines()
        .filter(|l| l.trim_start().starts_with("--"))
        .count();
    assert_eq!(
        options,
        help.matches("[env: ").count(),
        "every option has an env var"
    );
}

/// Sends `SIGTERM` to `child` and waits (at most `within`) for it to exit; its status.
pub async fn terminate(child: &mut Child, within: Duration) -> ExitStatus {
    signal(child.id(), "TERM");
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no exit within {within:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
