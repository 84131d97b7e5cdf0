//! Configuration of `grid-api`: command-line flags (with `GRID_API_*` environment variables) over
//! an optional TOML file.
//!
//! The file refuses unknown keys, naming the key, so that a typo never silently turns a setting off.

use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default time a finished job's result is kept by the API after the node forgot it.
pub const DEFAULT_JOB_RETENTION_SECS: u64 = 86_400;

/// What can go wrong reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or holds an unknown or mistyped key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// No data directory given.
    #[error(
        "no data directory: pass --data-dir, set GRID_API_DATA_DIR or data_dir in the config file"
    )]
    MissingDataDir,
    /// A listen address does not parse.
    #[error("listen address {value:?} is not host:port: {source}")]
    BadListen {
        /// The value.
        value: String,
        /// Cause.
        source: std::net::AddrParseError,
    },
    /// A token is empty or used twice.
    #[error("api token {name:?}: {problem}")]
    BadToken {
        /// The token's name.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A configured node is incomplete.
    #[error("node {id:?} in the config file: {problem}")]
    BadNode {
        /// The node id.
        id: String,
        /// What is wrong.
        problem: String,
    },
}

/// Command-line flags; each one may also come from its `GRID_API_*` environment variable.
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "grid-api", version, about = "Grid API server")]
pub struct Cli {
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "GRID_API_LISTEN")]
    pub listen: Option<String>,
    /// Directory of the state store (state.redb).
    #[arg(long, env = "GRID_API_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, env = "GRID_API_CONFIG")]
    pub config: Option<PathBuf>,
    /// A static token named "admin" with the admin scope.
    #[arg(long, env = "GRID_API_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A token nodes present to `POST /nodes/join` (repeatable).
    #[arg(long, env = "GRID_API_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Vec<String>,
}

/// The scope of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GET and HEAD only.
    Read,
    /// Everything.
    Admin,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        })
    }
}

/// A static API token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Name shown in logs and error messages.
    pub name: String,
    /// The secret itself.
    pub token: String,
    /// What it may do.
    pub scope: Scope,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// How JWTs are verified.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// PEM public key (P-384) for ES384 tokens.
    #[serde(default)]
    pub es384_public_key_pem: Option<String>,
    /// Scope-claim values that grant admin.
    #[serde(default = "default_admin_scopes")]
    pub admin_scopes: Vec<String>,
    /// Scope-claim values that grant read.
    #[serde(default = "default_read_scopes")]
    pub read_scopes: Vec<String>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("hs256", &self.hs256_secret.is_some())
            .field("es384", &self.es384_public_key_pem.is_some())
            .field("admin_scopes", &self.admin_scopes)
            .field("read_scopes", &self.read_scopes)
            .finish()
    }
}

fn default_admin_scopes() -> Vec<String> {
    vec!["grid:admin".to_string()]
}

fn default_read_scopes() -> Vec<String> {
    vec!["grid:read".to_string()]
}

/// A node known from the configuration (registered at start with source "config").
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id.
    pub id: String,
    /// `host:port` of its Redis.
    pub redis_addr: String,
    /// Password of its Redis.
    #[serde(default)]
    pub redis_password: String,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("id", &self.id)
            .field("redis_addr", &self.redis_addr)
            .finish_non_exhaustive()
    }
}

/// The TOML file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address.
    #[serde(default)]
    pub listen: Option<String>,
    /// Data directory.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Join tokens.
    #[serde(default)]
    pub join_tokens: Vec<String>,
    /// Seconds finished job results are kept.
    #[serde(default)]
    pub job_retention_secs: Option<u64>,
    /// Static tokens.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// JWT verification.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Nodes from configuration.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

impl FileConfig {
    /// Parses the TOML text of a config file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }
}

/// The resolved configuration of a `grid-api` process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the state store.
    pub data_dir: PathBuf,
    /// Tokens accepted by `POST /nodes/join`.
    pub join_tokens: Vec<String>,
    /// How long finished job results are kept by the API.
    pub job_retention: Duration,
    /// Static API tokens.
    pub tokens: Vec<TokenConfig>,
    /// JWT verification, when configured.
    pub jwt: Option<JwtConfig>,
    /// Nodes from configuration.
    pub nodes: Vec<NodeConfig>,
}

impl Config {
    /// A configuration for tests and embedding: no tokens, no nodes, default retention.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            join_tokens: Vec::new(),
            job_retention: Duration::from_secs(DEFAULT_JOB_RETENTION_SECS),
            tokens: Vec::new(),
            jwt: None,
            nodes: Vec::new(),
        }
    }

    /// Reads the config file named by the flags (if any) and lays the flags over it.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                FileConfig::parse(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    /// Lays the flags over a parsed file and checks the result.
    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let listen_text = cli
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text
            .parse()
            .map_err(|source| ConfigError::BadListen {
                value: listen_text.clone(),
                source,
            })?;
        let data_dir = cli
            .data_dir
            .clone()
            .or(file.data_dir)
            .ok_or(ConfigError::MissingDataDir)?;
        let mut join_tokens = file.join_tokens;
        join_tokens.extend(cli.join_token.iter().cloned());
        join_tokens.retain(|t| !t.is_empty());
        let mut tokens = file.tokens;
        if let Some(token) = &cli.admin_token {
            tokens.push(TokenConfig {
                name: "admin".to_string(),
                token: token.clone(),
                scope: Scope::Admin,
            });
        }
        for (i, t) in tokens.iter().enumerate() {
            if t.token.is_empty() {
                return Err(ConfigError::BadToken {
                    name: t.name.clone(),
                    problem: "the token is empty",
                });
            }
            if tokens[..i].iter().any(|o| o.token == t.token) {
                return Err(ConfigError::BadToken {
                    name: t.name.clone(),
                    problem: "the same secret is configured twice",
                });
            }
        }
        for n in &file.nodes {
            grid_proto::NodeId::new(n.id.clone()).map_err(|e| ConfigError::BadNode {
                id: n.id.clone(),
                problem: e.to_string(),
            })?;
            if n.redis_addr.is_empty() {
                return Err(ConfigError::BadNode {
                    id: n.id.clone(),
                    problem: "redis_addr is empty".to_string(),
                });
            }
        }
        Ok(Self {
            listen,
            data_dir,
            join_tokens,
            job_retention: Duration::from_secs(
                file.job_retention_secs
                    .unwrap_or(DEFAULT_JOB_RETENTION_SECS),
            ),
            tokens,
            jwt: file.jwt,
            nodes: file.nodes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("grid.toml"), text)
    }

    #[test]
    fn full_file_parses() {
        let f = parse(
            r#"
            listen = "127.0.0.1:9000"
            data_dir = "/tmp/x"
            join_tokens = ["j1"]
            job_retention_secs = 60
            [[tokens]]
            name = "ro"
            token = "secret-ro"
            scope = "read"
            [jwt]
            hs256_secret = "s"
            [[nodes]]
            id = "n1"
            redis_addr = "127.0.0.1:6379"
            "#,
        )
        .expect("valid file");
        let c = Config::merge(&Cli::default(), f).expect("valid config");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.job_retention, Duration::from_secs(60));
        assert_eq!(c.tokens[0].scope, Scope::Read);
        let jwt = c.jwt.expect("jwt");
        assert_eq!(jwt.admin_scopes, ["grid:admin"]);
        assert_eq!(jwt.read_scopes, ["grid:read"]);
        assert_eq!(c.nodes[0].redis_password, "");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("listne = \"x\"").expect_err("unknown key");
        assert!(e.to_string().contains("listne"), "{e}");
        let e = parse("[jwt]\nhs256 = \"x\"").expect_err("unknown nested key");
        assert!(e.to_string().contains("hs256"), "{e}");
        let e = parse("[[tokens]]\nname = \"a\"\ntoken = \"b\"\nscope = \"root\"")
            .expect_err("bad scope");
        assert!(e.to_string().contains("root"), "{e}");
    }

    #[test]
    fn flags_win_and_admin_token_is_added() {
        let cli = Cli {
            listen: Some("127.0.0.1:1".into()),
            data_dir: Some("/d".into()),
            admin_token: Some("tok".into()),
            join_token: vec!["j".into()],
            ..Cli::default()
        };
        let file = parse("listen = \"127.0.0.1:2\"\njoin_tokens = [\"f\"]").expect("file");
        let c = Config::merge(&cli, file).expect("config");
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.join_tokens, ["f", "j"]);
        assert_eq!(c.tokens[0].name, "admin");
        assert_eq!(c.tokens[0].scope, Scope::Admin);
    }

    #[test]
    fn data_dir_is_required() {
        let e = Config::merge(&Cli::default(), FileConfig::default()).expect_err("no data dir");
        assert!(matches!(e, ConfigError::MissingDataDir));
    }
}
