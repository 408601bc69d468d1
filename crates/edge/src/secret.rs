//! Credentials from flags, environment variables or files, never printed.
//!
//! A [`Secret`] is a string whose `Debug` and `Display` print `<redacted>`, so a configuration
//! dumped with `{:?}` or a tracing field cannot leak it. Each secret option has a `…-file`
//! twin (a mounted Kubernetes Secret or a Docker secret); [`resolve`] reads it.

use std::{fmt, path::Path};

use anyhow::Context as _;

/// A password, token or similar: the value is reachable only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for handing to a client library (never to a log).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// The secret given directly, else the content of `file` (one trailing newline stripped, as
/// `echo` and most secret stores write one), else none. `flag` names the option in errors.
pub(crate) fn resolve(
    value: Option<&Secret>,
    file: Option<&Path>,
    flag: &str,
) -> anyhow::Result<Option<Secret>> {
    if let Some(value) = value {
        return Ok(Some(value.clone()));
    }
    let Some(file) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{flag}-file: cannot read {}", file.display()))?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    anyhow::ensure!(!text.is_empty(), "{flag}-file: {} is empty", file.display());
    Ok(Some(Secret::new(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed_and_read_from_files() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");

        let dir = std::env::temp_dir().join(format!("tokenfan-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("pw");
        std::fs::write(&file, "from-file\n").expect("write");
        let got = resolve(None, Some(&file), "--x")
            .expect("read")
            .expect("some");
        assert_eq!(got.expose(), "from-file");
        // The flag (or its environment variable) wins over the file.
        let got = resolve(Some(&s), Some(&file), "--x")
            .expect("ok")
            .expect("some");
        assert_eq!(got.expose(), "hunter2");
        std::fs::write(&file, "\n").expect("write");
        let err = resolve(None, Some(&file), "--x").expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = resolve(None, Some(&dir.join("missing")), "--x").expect_err("missing");
        assert!(err.to_string().contains("--x-file"), "{err}");
        assert!(resolve(None, None, "--x").expect("none").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
