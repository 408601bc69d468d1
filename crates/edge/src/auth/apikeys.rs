//! API keys: each bearer key maps to one tenant.
//!
//! Keys come from `--api-keys-file` (one `KEY TENANT` pair per line; blank lines and lines
//! starting with `#` are skipped) and/or `--api-keys` / `TOKENFAN_EDGE_API_KEYS`
//! (`key1:tenantA,key2:tenantB`; the first `:` separates key and tenant). Only SHA-256
//! digests of the keys are kept in memory; a presented key is hashed and looked up by digest,
//! so the lookup's timing depends on the digest, never on how much of a key matched.

use std::{collections::HashMap, path::Path};

use ring::digest;

use crate::tenant::check_tenant;

/// Key digests → tenant.
pub struct ApiKeys {
    tenants: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.tenants.len())
    }
}

fn hash(key: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, key.as_bytes()).as_ref());
    out
}

impl ApiKeys {
    /// Reads the file (if any) and the inline pairs; refuses an empty set, a malformed line,
    /// a bad tenant name, and a key given twice with different tenants.
    pub fn load(file: Option<&Path>, inline: &[String]) -> anyhow::Result<Self> {
        let mut pairs: Vec<(String, String, String)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let (Some(key), Some(tenant), None) = (words.next(), words.next(), words.next())
                else {
                    anyhow::bail!(
                        "--api-keys-file {} line {}: expected `KEY TENANT`",
                        path.display(),
                        n + 1
                    );
                };
                let place = format!("--api-keys-file {} line {}", path.display(), n + 1);
                pairs.push((key.to_owned(), tenant.to_owned(), place));
            }
        }
        for (i, pair) in inline.iter().enumerate() {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let Some((key, tenant)) = pair.split_once(':') else {
                anyhow::bail!("--api-keys entry {}: expected `KEY:TENANT`", i + 1);
            };
            pairs.push((
                key.trim().to_owned(),
                tenant.trim().to_owned(),
                format!("--api-keys entry {}", i + 1),
            ));
        }
        let mut tenants = HashMap::new();
        for (key, tenant, place) in pairs {
            anyhow::ensure!(
                !key.is_empty() && !key.chars().any(char::is_whitespace),
                "{place}: empty key"
            );
            check_tenant(&tenant).map_err(|why| anyhow::anyhow!("{place}: the tenant {why}"))?;
            if key.len() < 16 {
                tracing::warn!("{place}: API key shorter than 16 characters; use long random keys");
            }
            match tenants.insert(hash(&key), tenant.clone()) {
                Some(previous) if previous != tenant => {
                    anyhow::bail!("{place}: this key is already given to tenant {previous:?}")
                }
                _ => {}
            }
        }
        anyhow::ensure!(
            !tenants.is_empty(),
            "--auth api-keys needs keys: --api-keys-file FILE or TOKENFAN_EDGE_API_KEYS=key:tenant,…"
        );
        Ok(Self { tenants })
    }

    /// The tenant of `key`, if it is one.
    pub fn tenant(&self, key: &str) -> Option<&str> {
        self.tenants.get(&hash(key)).map(String::as_str)
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    /// Whether no key is configured (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_a_file_and_inline_map_to_tenants() {
        let dir = std::env::temp_dir().join(format!("tokenfan-apikeys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys");
        std::fs::write(
            &path,
            "# comment\n\nsk-aaaaaaaaaaaaaaaa  acme\nsk-bbbbbbbbbbbbbbbb\tglobex\n",
        )
        .expect("write");
        let keys = ApiKeys::load(Some(&path), &["sk-cccccccccccccccc:org:1".into()]).expect("ok");
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.tenant("sk-aaaaaaaaaaaaaaaa"), Some("acme"));
        assert_eq!(keys.tenant("sk-bbbbbbbbbbbbbbbb"), Some("globex"));
        assert_eq!(keys.tenant("sk-cccccccccccccccc"), Some("org:1"));
        assert_eq!(keys.tenant("sk-aaaaaaaaaaaaaaab"), None);
        assert_eq!(keys.tenant(""), None);

        std::fs::write(&path, "just-a-key\n").expect("write");
        assert!(ApiKeys::load(Some(&path), &[]).is_err());
        assert!(ApiKeys::load(None, &[]).is_err());
        assert!(ApiKeys::load(None, &["nocolon".into()]).is_err());
        assert!(ApiKeys::load(None, &["k1:a".into(), "k1:b".into()]).is_err());
        assert!(ApiKeys::load(None, &["k1:".into()]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
