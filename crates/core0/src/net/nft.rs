//! Reading `nft -j` listings: the chains and rules of a table or of the whole ruleset.

use serde_json::Value;

/// Why an `nft -j` listing could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The listing is not the JSON `nft` writes.
    #[error("cannot parse the nft listing of {what}: {reason}")]
    Parse {
        /// What was listed, e.g. `table inet grid0`.
        what: String,
        /// Why.
        reason: String,
    },
}

/// A chain of an nftables listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    /// Its family, e.g. `inet`.
    pub family: String,
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// For a base chain: its type (`filter`, `nat`, `route`).
    pub kind: Option<String>,
    /// For a base chain: its hook (`forward`, `postrouting`, ...).
    pub hook: Option<String>,
    /// For a base chain: its priority as a number.
    pub prio: Option<i64>,
    /// For a base chain: its policy (`accept` or `drop`).
    pub policy: Option<String>,
}

/// A rule of an nftables listing.
#[derive(Debug, Clone, PartialEq)]
pub struct NftRule {
    /// Its chain.
    pub chain: String,
    /// Its handle (what `delete rule ... handle <n>` takes).
    pub handle: u64,
    /// Its comment, if any.
    pub comment: Option<String>,
    /// Its statements, as `nft -j` writes them.
    pub expr: Vec<Value>,
}

/// The chains and rules of an `nft -j list ...` output, in listing order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NftListing {
    /// Every chain.
    pub chains: Vec<NftChain>,
    /// Every rule.
    pub rules: Vec<NftRule>,
}

impl NftListing {
    /// The chain called `name`.
    pub fn chain(&self, name: &str) -> Option<&NftChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// The rules of chain `name`.
    pub fn rules_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a NftRule> + 'a {
        self.rules.iter().filter(move |r| r.chain == name)
    }
}

/// Parses the output of `nft -j list <what>`.
pub fn parse_listing(what: &str, json: &str) -> Result<NftListing, NftError> {
    let err = |reason: String| NftError::Parse {
        what: what.to_owned(),
        reason,
    };
    let root: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
    let items = root
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| err("no \"nftables\" array".into()))?;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut listing = NftListing::default();
    for item in items {
        if let Some(c) = item.get("chain") {
            listing.chains.push(NftChain {
                family: text(c, "family").unwrap_or_default(),
                table: text(c, "table").unwrap_or_default(),
                name: text(c, "name").ok_or_else(|| err("a chain has no name".into()))?,
                kind: text(c, "type"),
                hook: text(c, "hook"),
                prio: c.get("prio").and_then(Value::as_i64),
                policy: text(c, "policy"),
            });
        } else if let Some(r) = item.get("rule") {
            listing.rules.push(NftRule {
                chain: text(r, "chain").ok_or_else(|| err("a rule has no chain".into()))?,
                handle: r
                    .get("handle")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| err("a rule has no handle".into()))?,
                comment: text(r, "comment"),
                expr: r
                    .get("expr")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chains_and_rules() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "inet", "name": "grid0", "handle": 1}},
          {"chain": {"family": "inet", "table": "grid0", "name": "forward", "handle": 4, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
          {"chain": {"family": "inet", "table": "grid0", "name": "plain", "handle": 5}},
          {"rule": {"family": "inet", "table": "grid0", "chain": "forward", "handle": 9, "comment": "x", "expr": [{"accept": null}]}}]}"#;
        let l = parse_listing("table inet grid0", json).expect("valid listing");
        assert_eq!(l.chains.len(), 2);
        let f = l.chain("forward").expect("forward chain is listed");
        assert_eq!(f.hook.as_deref(), Some("forward"));
        assert_eq!(f.prio, Some(0));
        assert_eq!(l.chain("plain").and_then(|c| c.hook.clone()), None);
        let rules: Vec<_> = l.rules_of("forward").collect();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].handle, 9);
        assert_eq!(rules[0].comment.as_deref(), Some("x"));
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_listing("x", "nope").is_err());
        assert!(parse_listing("x", "{}").is_err());
    }
}
