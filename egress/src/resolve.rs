//! `flower egress resolve`: a DNS resolver for the switchboard.
//!
//! Registers for connects that carry `server_hostname` and `server_service`, and
//! answers each with one target per address, all of weight 1 (so the switchboard
//! spreads connects over them and falls back to the next when one fails):
//!
//! ```text
//! {"server_hostname":"localhost","server_service":"http"}
//!   → {"address_family":"inet","server_address":"127.0.0.1","server_port":"80"}
//! ```
//!
//! Names are looked up in this order, first hit wins:
//!
//! 1. a numeric address is its own answer (cached for [`NUMERIC_LIFETIME`]);
//! 2. the hosts file (`/etc/hosts`), re-read when it changes (cached for
//!    [`HOSTS_LIFETIME`], so edits are seen quickly);
//! 3. `localhost` and `*.localhost` are the loopback addresses (RFC 6761);
//! 4. DNS, with the servers of `/etc/resolv.conf`, A and AAAA records; the answer is
//!    cached for the records' remaining TTL.
//!
//! A service is a port number or a name from the services file (`/etc/services`, tcp).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use flower_proto::client::ResolveRequest;
use flower_proto::resolver::{Candidate, ResolveResponse};
use flower_proto::switchboard::Right;
use flower_proto::{Labels, Status};
use flower_tools::labels::{
    ADDRESS_FAMILY, INET, INET6, SERVER_ADDRESS, SERVER_HOSTNAME, SERVER_PORT, SERVER_SERVICE,
    required,
};
use flower_tools::ready::Startup;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};

/// The labels this resolver expands.
pub const RESOLVE_KEYS: [&str; 2] = [SERVER_HOSTNAME, SERVER_SERVICE];
/// Cache lifetime of answers taken from the hosts file.
pub const HOSTS_LIFETIME: Duration = Duration::from_secs(10);
/// Cache lifetime of numeric "names", which never change.
pub const NUMERIC_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct ResolveOptions {
    pub hosts_file: PathBuf,
    pub services_file: PathBuf,
    /// Query DNS for names not found locally.
    pub dns: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            hosts_file: "/etc/hosts".into(),
            services_file: "/etc/services".into(),
            dns: true,
        }
    }
}

/// Registers a resolver and serves forever, re-registering after switchboard restarts.
pub async fn resolve(
    path: &Path,
    labels: &Labels,
    options: ResolveOptions,
    startup: Startup,
) -> Result<()> {
    let names = Arc::new(Names::new(options));
    // LABELS go in the request, not on the handle: labels fixed on the registering
    // handle would be the resolver's scope, and it would only ever resolve names for
    // connects that carry LABELS. As request in-labels they only keep it from
    // connects that contradict them; as out-labels they send its answers to the
    // egress registered under LABELS.
    crate::keep_registered(
        path,
        Right::ResolverStart,
        &Labels::new(),
        labels,
        startup,
        |handle| async move { Ok(handle.resolver_start(&RESOLVE_KEYS, labels, labels).await?) },
        |mut resolver| {
            let names = names.clone();
            async move {
                tracing::info!("resolver registered");
                while let Some(request) = resolver.next().await {
                    let names = names.clone();
                    tokio::spawn(async move { answer(&names, request).await });
                }
            }
        },
    )
    .await
}

async fn answer(names: &Names, request: ResolveRequest) {
    let result = names.resolve(&request.labels).await;
    match &result {
        Ok(response) => {
            tracing::debug!(labels = ?request.labels, targets = response.targets.len(), "resolved")
        }
        Err(e) => tracing::info!(labels = ?request.labels, "cannot resolve: {e}"),
    }
    request.respond(result);
}

/// A file's modification time and size: when either changes, re-read it.
type FileStamp = (SystemTime, u64);

/// Name and service lookup.
pub struct Names {
    dns: Option<TokioResolver>,
    hosts: TextFile,
    services: TextFile,
}

impl Names {
    pub fn new(options: ResolveOptions) -> Names {
        let dns = if options.dns {
            match TokioResolver::builder_tokio() {
                Ok(mut builder) => {
                    // The hosts file is ours to read (and to re-read when it changes).
                    builder.options_mut().use_hosts_file = ResolveHosts::Never;
                    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
                    Some(builder.build())
                }
                Err(e) => {
                    tracing::warn!("no DNS (only numeric, hosts-file and localhost names): {e}");
                    None
                }
            }
        } else {
            None
        };
        Names {
            dns,
            hosts: TextFile::new(&options.hosts_file),
            services: TextFile::new(&options.services_file),
        }
    }

    /// Answers one `Resolve` call.
    pub async fn resolve(&self, labels: &Labels) -> Result<ResolveResponse, Status> {
        let host = required(labels, SERVER_HOSTNAME)?;
        let service = required(labels, SERVER_SERVICE)?;
        let port = self.port(service).await?;
        let (addresses, lifetime) = self.addresses(host).await?;
        let targets = addresses
            .into_iter()
            .map(|ip| Candidate {
                out_labels: Labels::from([
                    (
                        ADDRESS_FAMILY.into(),
                        if ip.is_ipv4() { INET } else { INET6 }.into(),
                    ),
                    (SERVER_ADDRESS.into(), ip.to_string()),
                    (SERVER_PORT.into(), port.to_string()),
                ]),
                weight: 1,
            })
            .collect();
        Ok(ResolveResponse {
            targets,
            max_cache_duration_seconds: lifetime.as_secs().try_into().unwrap_or(u32::MAX),
        })
    }

    async fn port(&self, service: &str) -> Result<u16, Status> {
        if let Ok(port) = service.parse::<u16>() {
            return Ok(port);
        }
        services_lookup(&self.services.text().await, service).ok_or_else(|| {
            Status::invalid_argument(format!(
                "Label server_service {service:?} is neither a port number nor a known tcp service"
            ))
        })
    }

    async fn addresses(&self, host: &str) -> Result<(Vec<IpAddr>, Duration), Status> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok((vec![ip], NUMERIC_LIFETIME));
        }
        let found = hosts_lookup(&self.hosts.text().await, host);
        if !found.is_empty() {
            return Ok((found, HOSTS_LIFETIME));
        }
        let lower = host.trim_end_matches('.').to_ascii_lowercase();
        if lower == "localhost" || lower.ends_with(".localhost") {
            let loopback = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
            return Ok((loopback, HOSTS_LIFETIME));
        }
        let Some(dns) = &self.dns else {
            return Err(Status::not_found(format!(
                "Cannot resolve {host}: not in {} and DNS is off",
                self.hosts.path.display()
            )));
        };
        match dns.lookup_ip(host).await {
            Ok(lookup) => {
                let lifetime = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                let addresses: Vec<IpAddr> = lookup.iter().collect();
                if addresses.is_empty() {
                    return Err(Status::not_found(format!(
                        "Cannot resolve {host}: no addresses"
                    )));
                }
                Ok((addresses, lifetime))
            }
            Err(e) if e.is_nx_domain() => Err(Status::not_found(format!(
                "Cannot resolve {host}: no such domain"
            ))),
            Err(e) if e.is_no_records_found() => Err(Status::not_found(format!(
                "Cannot resolve {host}: no addresses"
            ))),
            Err(e) => Err(Status::unavailable(format!("Cannot resolve {host}: {e}"))),
        }
    }
}

/// A small system file (hosts, services), re-read only when its modification time
/// or size changes; a missing file reads as empty.
struct TextFile {
    path: PathBuf,
    /// The text and the stamp it was read at.
    cache: Mutex<Option<(FileStamp, Arc<String>)>>,
}

impl TextFile {
    fn new(path: &Path) -> TextFile {
        TextFile {
            path: path.to_owned(),
            cache: Mutex::new(None),
        }
    }

    async fn text(&self) -> Arc<String> {
        let Ok(stamp) = tokio::fs::metadata(&self.path)
            .await
            .and_then(|m| Ok((m.modified()?, m.len())))
        else {
            return Arc::default();
        };
        if let Some((seen, text)) = &*self.cache.lock().unwrap()
            && *seen == stamp
        {
            return text.clone();
        }
        let text = Arc::new(
            tokio::fs::read_to_string(&self.path)
                .await
                .unwrap_or_default(),
        );
        *self.cache.lock().unwrap() = Some((stamp, text.clone()));
        text
    }
}

/// Addresses for `name` in hosts-file text, in file order (names match without case).
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if words.any(|w| w.eq_ignore_ascii_case(name)) && !found.contains(&ip) {
            found.push(ip);
        }
    }
    found
}

/// The tcp port of a named service in services-file text.
pub fn services_lookup(text: &str, service: &str) -> Option<u16> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let name = words.next()?;
        let (port, protocol) = words.next()?.split_once('/')?;
        let named = name == service || words.any(|alias| alias == service);
        (protocol == "tcp" && named).then(|| port.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_order_and_case() {
        let text = "# comment\n127.0.0.2 Web web.local # second\n::1 localhost\n\
                    bogus line\n127.0.0.1 web\n127.0.0.2 web\n";
        assert_eq!(
            hosts_lookup(text, "WEB."),
            [
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "127.0.0.1".parse().unwrap()
            ]
        );
        assert!(hosts_lookup(text, "comment").is_empty());
        assert!(hosts_lookup(text, "second").is_empty());
    }

    #[tokio::test]
    async fn answers_from_the_hosts_file_with_its_lifetime_and_sees_edits() {
        let dir = std::env::temp_dir().join(format!("flower-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.9 web\n::1 web\n").unwrap();
        let names = Names::new(ResolveOptions {
            hosts_file: hosts.clone(),
            services_file: dir.join("services"),
            dns: false,
        });
        let ask = |host: &str, service: &str| {
            Labels::from([
                ("server_hostname".into(), host.into()),
                ("server_service".into(), service.into()),
            ])
        };
        let answer = names.resolve(&ask("web", "8080")).await.unwrap();
        assert_eq!(answer.max_cache_duration_seconds, 10);
        let got: Vec<(&str, &str, &str, u32)> = answer
            .targets
            .iter()
            .map(|t| {
                let l = &t.out_labels;
                (
                    l["address_family"].as_str(),
                    l["server_address"].as_str(),
                    l["server_port"].as_str(),
                    t.weight,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("inet", "127.0.0.9", "8080", 1),
                ("inet6", "::1", "8080", 1)
            ]
        );

        // An edit is seen on the next call (the file's mtime changed).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&hosts, "127.0.0.10 web\n").unwrap();
        let answer = names.resolve(&ask("web", "80")).await.unwrap();
        assert_eq!(answer.targets.len(), 1);
        assert_eq!(answer.targets[0].out_labels["server_address"], "127.0.0.10");

        // Numeric names answer themselves; unknown names without DNS are NOT_FOUND.
        let answer = names.resolve(&ask("[::1]", "1")).await.unwrap();
        assert_eq!(answer.targets[0].out_labels["address_family"], "inet6");
        assert_eq!(answer.max_cache_duration_seconds, 3600);
        let err = names.resolve(&ask("nowhere", "1")).await.unwrap_err();
        assert_eq!(err.code, flower_proto::Code::NotFound);
        let err = names.resolve(&ask("web", "no-such")).await.unwrap_err();
        assert_eq!(err.code, flower_proto::Code::InvalidArgument);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn services_by_name_and_alias() {
        let text = "http 80/tcp www # WorldWideWeb\nhttp 80/udp\ndomain 53/udp\n";
        assert_eq!(services_lookup(text, "http"), Some(80));
        assert_eq!(services_lookup(text, "www"), Some(80));
        assert_eq!(services_lookup(text, "domain"), None);
    }
}
