//! The commands that talk to a running node, printed for a human. Most are one HTTP call.
//! `register` goes through the Rust SDK (`sextant-client`) over gRPC, so that the CLI
//! validates and keeps a lease alive exactly as an application does, and `watch` reads the
//! HTTP watch with the SDK's SSE parser.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};
use sextant_client::sse::SseParser;
use sextant_client::{Health, Location, Registration, ServiceName};

use crate::cli::{
    AclCommand, Command, PolicyCommand, RegisterArgs, RestoreArgs, SnapshotCommand, TokenCommand,
    XdsCommand,
};
use sextant_server::xds_bootstrap::{self, BootstrapNode};

/// The node's HTTP API (the SDK speaks gRPC only, and has no operator commands).
struct Http {
    base: String,
    http: reqwest::Client,
}

/// The TLS flags of the client commands, for `https://` servers.
#[derive(Debug, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
    }

    fn http(&self, mut b: reqwest::ClientBuilder) -> anyhow::Result<reqwest::ClientBuilder> {
        if let Some(ca) = &self.ca {
            let cert = reqwest::Certificate::from_pem(&Self::read(ca, "CA (--tls-ca)")?)
                .with_context(|| format!("--tls-ca {}", ca.display()))?;
            b = b.tls_certs_only([cert]);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let mut pem = Self::read(cert, "client certificate")?;
            pem.extend(Self::read(key, "client key")?);
            b = b.identity(
                reqwest::Identity::from_pem(&pem)
                    .context("--tls-client-cert / --tls-client-key")?,
            );
        }
        Ok(b)
    }

    fn sdk(&self, mut b: sextant_client::ClientBuilder) -> sextant_client::ClientBuilder {
        if let Some(ca) = &self.ca {
            b = b.tls_ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            b = b.tls_identity_files(cert, key);
        }
        b
    }
}

impl Http {
    fn new(base: &str, tls: &ClientTls, token: Option<&str>) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .context("the token holds characters a header cannot")?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = tls
            .http(
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .default_headers(headers),
            )?
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("cannot reach sextant at {}", self.base))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(body)
    }
}

/// `sextant snapshot save`: fetches the snapshot, checks it, writes it beside FILE and renames
/// it over FILE once it is on disk, so FILE is always a whole snapshot.
async fn snapshot_save(c: &Http, file: &std::path::Path) -> anyhow::Result<()> {
    let resp = c
        .http
        .get(c.url("/v1/snapshot"))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .with_context(|| format!("cannot reach sextant at {}", c.base))?;
    let status = resp.status();
    let bytes = resp.bytes().await.context("the snapshot was cut short")?;
    if !status.is_success() {
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let msg = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{msg} (HTTP {})", status.as_u16());
    }
    let snap =
        sextant_server::Snapshot::from_bytes(&bytes).context("the node sent a bad snapshot")?;
    let tmp = file.with_extension("partial");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, file)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), file.display()))?;
    let (services, instances) = snap.counts();
    println!(
        "saved revision {} ({services} services, {instances} instances, {} bytes) to {}",
        snap.revision,
        bytes.len(),
        file.display()
    );
    Ok(())
}

/// `sextant snapshot restore`: reads and checks FILE, then writes it into the empty store.
async fn snapshot_restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let snap = sextant_server::Snapshot::read_from(
        &mut std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?,
    )
    .with_context(|| format!("cannot use {}", args.file.display()))?;
    let (services, instances) = snap.counts();
    let revision = snap.revision;
    sextant_server::restore_snapshot(&config, snap)
        .await
        .context("cannot restore")?;
    let target = match config.store {
        sextant_server::StoreKind::Etcd => format!(
            "etcd {} under {}",
            config.etcd_endpoints, config.etcd_prefix
        ),
        _ => format!("{}", config.data_dir.display()),
    };
    println!(
        "restored revision {revision} ({services} services, {instances} instances) into {target}"
    );
    Ok(())
}

fn split_service(s: &str) -> anyhow::Result<(&str, &str)> {
    s.split_once('/')
        .with_context(|| format!("{s:?} is not of the form namespace/service"))
}

fn instance_path(service: &str, id: &str) -> anyhow::Result<String> {
    let (ns, svc) = split_service(service)?;
    Ok(format!("/v1/namespaces/{ns}/services/{svc}/instances/{id}"))
}

/// Runs one command against the node whose HTTP API is at `server` (and gRPC API at `grpc`,
/// for `register`).
pub async fn run(
    server: &str,
    grpc: &str,
    tls: &ClientTls,
    token: Option<&str>,
    cmd: Command,
) -> anyhow::Result<()> {
    let c = Http::new(server, tls, token)?;
    match cmd {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Register(args) => register(grpc, tls, token, args).await,
        Command::Acl(a) => acl(&c, a).await,
        Command::Audit {
            namespace,
            since,
            json,
        } => audit(&c, namespace, since, json).await,
        Command::Deregister { service, id } => {
            let v = c
                .send(c.http.delete(c.url(&instance_path(&service, &id)?)))
                .await?;
            println!("deregistered {service}/{id} at revision {}", v["revision"]);
            Ok(())
        }
        Command::Status(a) => {
            let mut body = serde_json::Map::new();
            if let Some(h) = a.health {
                body.insert("health".into(), json!(h));
            }
            if let Some(e) = a.enabled {
                body.insert("enabled".into(), json!(e));
            }
            if let Some(w) = a.weight {
                body.insert("weight".into(), json!(w));
            }
            let path = instance_path(&a.service, &a.id)? + "/status";
            let v = c.send(c.http.patch(c.url(&path)).json(&body)).await?;
            println!(
                "status of {}/{} set at revision {}",
                a.service, a.id, v["revision"]
            );
            Ok(())
        }
        Command::Get {
            service,
            healthy,
            json,
        } => {
            let (ns, svc) = split_service(&service)?;
            let path = format!("/v1/namespaces/{ns}/services/{svc}?healthy={healthy}");
            let v = c.send(c.http.get(c.url(&path))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_service(&v);
            }
            Ok(())
        }
        Command::List { namespace: None } => {
            let v = c.send(c.http.get(c.url("/v1/namespaces"))).await?;
            println!("{:<32} {:>9} {:>10}", "NAMESPACE", "SERVICES", "INSTANCES");
            for n in v["namespaces"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>9} {:>10}",
                    n["namespace"].as_str().unwrap_or(""),
                    n["services"].to_string(),
                    n["instances"].to_string()
                );
            }
            Ok(())
        }
        Command::List {
            namespace: Some(ns),
        } => {
            let v = c
                .send(c.http.get(c.url(&format!("/v1/namespaces/{ns}/services"))))
                .await?;
            println!(
                "{:<40} {:>10} {:>8} {:>10}",
                "SERVICE", "INSTANCES", "SERVING", "REVISION"
            );
            for s in v["services"].as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:>10} {:>8} {:>10}",
                    s["service"].as_str().unwrap_or(""),
                    s["instances"].to_string(),
                    s["serving"].to_string(),
                    s["revision"].to_string()
                );
            }
            Ok(())
        }
        Command::Watch { services, since } => watch(&c, &services, since).await,
        Command::Drain { service, id } => {
            let path = instance_path(&service, &id)? + "/drain";
            let v = c.send(c.http.post(c.url(&path))).await?;
            println!("draining {service}/{id} at revision {}", v["revision"]);
            Ok(())
        }
        Command::Undrain { service, id } => {
            let path = instance_path(&service, &id)? + "/undrain";
            let v = c.send(c.http.post(c.url(&path))).await?;
            println!(
                "{service}/{id} back in discovery at revision {}",
                v["revision"]
            );
            Ok(())
        }
        Command::Weight {
            service,
            id,
            weight,
            clear,
        } => {
            let value = match (weight, clear) {
                (Some(w), false) => json!(w),
                (None, true) => Value::Null,
                _ => bail!("give a weight (0-10000) or --clear"),
            };
            let path = instance_path(&service, &id)? + "/status";
            let body = json!({ "weight_override": value });
            let v = c.send(c.http.patch(c.url(&path)).json(&body)).await?;
            println!(
                "weight override of {service}/{id} set at revision {}",
                v["revision"]
            );
            Ok(())
        }
        Command::Check(a) => {
            let (ns, svc) = split_service(&a.service)?;
            let (min, max) = a
                .status
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
                .with_context(|| format!("--status {:?} is not a range like 200-399", a.status))?;
            let body = json!({ "check": {
                "kind": a.kind,
                "interval_ms": a.interval.as_millis() as u64,
                "timeout_ms": a.timeout.as_millis() as u64,
                "rise": a.rise, "fall": a.fall,
                "port": a.port.unwrap_or(0),
                "http_path": a.path,
                "http_status_min": min, "http_status_max": max,
                "grpc_service": a.grpc_service,
            }});
            let path = format!("/v1/namespaces/{ns}/services/{svc}");
            let v = c.send(c.http.put(c.url(&path)).json(&body)).await?;
            println!("check of {} set at revision {}", a.service, v["revision"]);
            Ok(())
        }
        Command::Xds(XdsCommand::Bootstrap {
            node_id,
            cluster,
            region,
            zone,
            sub_zone,
        }) => {
            let node = BootstrapNode {
                id: node_id,
                cluster,
                region,
                zone,
                sub_zone,
            };
            // An https:// server gets TLS credentials naming the files by absolute path (the
            // client reads them from wherever it runs).
            let abs = |p: &PathBuf| -> anyhow::Result<String> {
                Ok(std::path::absolute(p)
                    .with_context(|| format!("{}", p.display()))?
                    .display()
                    .to_string())
            };
            let tls = if grpc.starts_with("https://") {
                Some(xds_bootstrap::BootstrapTls {
                    ca_certificate_file: tls.ca.as_ref().map(abs).transpose()?,
                    identity: match (&tls.cert, &tls.key) {
                        (Some(c), Some(k)) => Some((abs(c)?, abs(k)?)),
                        _ => None,
                    },
                })
            } else {
                None
            };
            let b = xds_bootstrap::render(xds_bootstrap::server_uri(grpc), &node, tls.as_ref());
            println!("{}", serde_json::to_string_pretty(&b)?);
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::Save { file }) => snapshot_save(&c, &file).await,
        Command::Snapshot(SnapshotCommand::Restore(args)) => snapshot_restore(&args).await,
        Command::Xds(XdsCommand::Clients { json }) => {
            let v = c.send(c.http.get(c.url("/v1/xds/clients"))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let clients = v["clients"].as_array().cloned().unwrap_or_default();
            if clients.is_empty() {
                println!("no xDS clients connected");
            }
            for cl in clients {
                println!(
                    "{} ({} stream {}, zone {:?}, from {})",
                    cl["node_id"].as_str().unwrap_or("?"),
                    cl["protocol"].as_str().unwrap_or("?"),
                    cl["stream"],
                    cl["zone"].as_str().unwrap_or(""),
                    cl["peer"].as_str().unwrap_or("?"),
                );
                if let Some(types) = cl["types"].as_object() {
                    for (t, st) in types {
                        println!(
                            "  {t}: sent {} acked {} nacks {} {}",
                            st["sent_version"].as_str().unwrap_or(""),
                            st["acked_version"].as_str().unwrap_or(""),
                            st["nacks"],
                            st["subscribed"],
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Cluster { json } => {
            let v = c.send(c.http.get(c.url("/v1/cluster"))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let store = &v["store"];
            println!(
                "node {} is {} at revision {}; store {} {} (head {})",
                v["node_id"].as_str().unwrap_or(""),
                v["role"].as_str().unwrap_or("?"),
                v["revision"],
                store["kind"].as_str().unwrap_or("?"),
                if store["healthy"] == true {
                    "healthy".to_string()
                } else {
                    format!("unhealthy: {}", store["error"].as_str().unwrap_or("?"))
                },
                store["head"],
            );
            if let Some(l) = v["leader"].as_str() {
                println!("leader: {l}");
            }
            for m in v["members"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<28} {:<9} revision {:<8} lag {:<6} seen {} ms ago  http {}  grpc {}",
                    m["node_id"].as_str().unwrap_or("?"),
                    m["role"].as_str().unwrap_or("?"),
                    m["revision"],
                    m["lag"],
                    m["last_seen_ms"],
                    m["http"].as_str().unwrap_or("?"),
                    m["grpc"].as_str().unwrap_or("?"),
                );
            }
            Ok(())
        }
        Command::Suspect { service, id } => {
            let (ns, svc) = split_service(&service)?;
            let body = json!({ "instances": [{ "namespace": ns, "service": svc, "id": id }] });
            let v = c
                .send(c.http.post(c.url("/v1/suspects")).json(&body))
                .await?;
            println!("{}", v["results"][0]["outcome"].as_str().unwrap_or("?"));
            Ok(())
        }
    }
}

async fn register(
    grpc: &str,
    tls: &ClientTls,
    token: Option<&str>,
    a: RegisterArgs,
) -> anyhow::Result<()> {
    let service: ServiceName = a.service.parse()?;
    let port = u16::try_from(a.port).with_context(|| format!("--port {} is not a port", a.port))?;
    let mut r = Registration::new(service, &a.host, port)
        .version(&a.version)
        .location(Location {
            region: a.region.as_str().into(),
            zone: a.zone.as_str().into(),
            idc: a.idc.as_str().into(),
        })
        .cell(&a.cell)
        .lane(&a.lane);
    if let Some(id) = &a.id {
        r = r.id(id);
    }
    if let Some(p) = &a.protocol {
        r = r.protocol(p);
    }
    if a.ttl > 0 {
        r = r.ttl(Duration::from_secs(u64::from(a.ttl)));
    }
    for m in &a.meta {
        let (k, v) = m
            .split_once('=')
            .with_context(|| format!("--meta {m:?} is not of the form key=value"))?;
        r = r.metadata(k, v);
    }
    if let Some(w) = a.weight {
        r = r.weight(w);
    }
    if let Some(h) = &a.health {
        r = r.health(Health::parse(h)?);
    }
    if a.disabled {
        r = r.enabled(false);
    }
    let mut builder = tls.sdk(sextant_client::Client::builder().servers([grpc]));
    if let Some(t) = token {
        builder = builder.token(t);
    }
    let client = builder.build()?;
    let key = client
        .register(r)
        .await
        .with_context(|| format!("cannot register at {grpc} (the node's gRPC API)"))?;
    println!("registered {key}");
    if !a.keepalive {
        // Dropping the client stops its tasks and leaves the instance registered.
        return Ok(());
    }
    // The SDK renews the lease (a third of the TTL at a time) and registers again if the
    // server forgot the instance; shutdown deregisters it.
    println!("keeping {key} alive; Ctrl-C deregisters it");
    tokio::signal::ctrl_c().await?;
    client.shutdown().await?;
    println!("deregistered {key}");
    Ok(())
}

fn print_service(v: &Value) {
    println!(
        "{}/{}  revision {}{}",
        v["namespace"].as_str().unwrap_or(""),
        v["service"].as_str().unwrap_or(""),
        v["revision"],
        if v["protected"].as_bool() == Some(true) {
            "  PROTECTED (too few serving; all instances shown)"
        } else {
            ""
        }
    );
    println!(
        "{:<28} {:<24} {:<8} {:<10} {:<8} {:>6} {:<10} {:<10}",
        "ID", "ADDRESS", "PROTO", "HEALTH", "ENABLED", "WEIGHT", "VERSION", "DRAINING"
    );
    for i in v["instances"].as_array().into_iter().flatten() {
        let draining = match i["status"]["draining_for_ms"].as_u64() {
            Some(ms) => format!("{}s", ms / 1000),
            None => "-".into(),
        };
        println!(
            "{:<28} {:<24} {:<8} {:<10} {:<8} {:>6} {:<10} {:<10}",
            i["id"].as_str().unwrap_or(""),
            format!("{}:{}", i["host"].as_str().unwrap_or(""), i["port"]),
            i["protocol"].as_str().unwrap_or(""),
            i["status"]["health"].as_str().unwrap_or(""),
            i["status"]["enabled"].to_string(),
            i["status"]["effective_weight"].to_string(),
            i["version"].as_str().unwrap_or(""),
            draining,
        );
    }
}

/// Reads the SSE stream and prints one line per event, as it arrives.
async fn watch(c: &Http, services: &[String], since: Option<u64>) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = services.iter().map(|s| ("service", s.clone())).collect();
    if let Some(s) = since {
        q.push(("since", s.to_string()));
    }
    let resp = c
        .http
        .get(c.url("/v1/watch"))
        .query(&q)
        .send()
        .await
        .with_context(|| format!("cannot reach sextant at {}", c.base))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        bail!(
            "{} (HTTP {})",
            body["error"]["message"].as_str().unwrap_or("watch refused"),
            status.as_u16()
        );
    }
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::new();
    let mut frames = Vec::new();
    while let Some(chunk) = stream.next().await {
        parser.push(&chunk?, &mut frames);
        for f in frames.drain(..) {
            let v: Value = serde_json::from_str(&f.data).unwrap_or(Value::Null);
            print_event(&f.event, &v);
            if f.event == "close" {
                return Ok(());
            }
        }
    }
    bail!("the server closed the stream")
}

fn print_event(event: &str, v: &Value) {
    let svc = format!(
        "{}/{}",
        v["namespace"].as_str().unwrap_or(""),
        v["service"].as_str().unwrap_or("")
    );
    let rev = &v["revision"];
    match event {
        "snapshot" => println!(
            "{rev} snapshot {svc} ({} instances){}",
            v["instances"].as_array().map_or(0, |a| a.len()),
            if v["resync"].as_bool() == Some(true) {
                " resync"
            } else {
                ""
            }
        ),
        "upsert" => println!(
            "{rev} upsert   {svc} {} {}:{}",
            v["instance"]["id"].as_str().unwrap_or(""),
            v["instance"]["host"].as_str().unwrap_or(""),
            v["instance"]["port"]
        ),
        "status" => println!(
            "{rev} status   {svc} {} {}",
            v["id"].as_str().unwrap_or(""),
            v["status"]
        ),
        "delete" => println!(
            "{rev} delete   {svc} {} ({})",
            v["id"].as_str().unwrap_or(""),
            v["reason"].as_str().unwrap_or("")
        ),
        "close" => println!(
            "stream closed by server: {}",
            v["reason"].as_str().unwrap_or("")
        ),
        other => println!("{other} {v}"),
    }
}

/// Prints a new token: its id, then its secret alone on the last line (for scripts: `tail -1`).
fn print_new_token(v: &Value) {
    println!("token id: {}", v["id"].as_str().unwrap_or("?"));
    println!("policies: {}", v["policies"]);
    println!("secret (shown once; keep it, send it as --token or SEXTANT_TOKEN):");
    println!("{}", v["secret"].as_str().unwrap_or(""));
}

async fn acl(c: &Http, cmd: AclCommand) -> anyhow::Result<()> {
    match cmd {
        AclCommand::Bootstrap => {
            let v = c.send(c.http.post(c.url("/v1/acl/bootstrap"))).await?;
            print_new_token(&v);
        }
        AclCommand::Token(TokenCommand::Create {
            policies,
            description,
            tls_identities,
        }) => {
            let body = json!({
                "policies": policies,
                "description": description,
                "tls_identities": tls_identities,
            });
            let v = c
                .send(c.http.post(c.url("/v1/acl/tokens")).json(&body))
                .await?;
            print_new_token(&v);
        }
        AclCommand::Token(TokenCommand::List) => {
            let v = c.send(c.http.get(c.url("/v1/acl/tokens"))).await?;
            println!("{:<18} {:<32} DESCRIPTION", "ID", "POLICIES");
            for t in v["tokens"].as_array().into_iter().flatten() {
                let policies: Vec<&str> = t["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "{:<18} {:<32} {}",
                    t["id"].as_str().unwrap_or(""),
                    policies.join(","),
                    t["description"].as_str().unwrap_or("")
                );
            }
        }
        AclCommand::Token(TokenCommand::Revoke { id }) => {
            let path = format!("/v1/acl/tokens/{id}");
            let v = c.send(c.http.delete(c.url(&path))).await?;
            println!("revoked token {id} at revision {}", v["revision"]);
        }
        AclCommand::Policy(PolicyCommand::Create {
            name,
            namespace,
            rights,
            service_prefix,
            instance_ids,
            rules_json,
            description,
        }) => {
            let rules: Value = match rules_json {
                Some(j) => serde_json::from_str(&j).context("--rules-json is not JSON")?,
                None => {
                    let rights: Vec<&str> = rights
                        .as_deref()
                        .unwrap_or("")
                        .split(',')
                        .map(str::trim)
                        .filter(|r| !r.is_empty())
                        .collect();
                    json!([{
                        "namespace": namespace,
                        "rights": rights,
                        "service_prefix": service_prefix,
                        "instance_ids": instance_ids,
                    }])
                }
            };
            let body = json!({ "description": description, "rules": rules });
            let path = format!("/v1/acl/policies/{name}");
            let v = c.send(c.http.put(c.url(&path)).json(&body)).await?;
            println!("policy {name} saved at revision {}", v["revision"]);
        }
        AclCommand::Policy(PolicyCommand::List) => {
            let v = c.send(c.http.get(c.url("/v1/acl/policies"))).await?;
            println!("{}", serde_json::to_string_pretty(&v["policies"])?);
        }
        AclCommand::Policy(PolicyCommand::Delete { name }) => {
            let path = format!("/v1/acl/policies/{name}");
            let v = c.send(c.http.delete(c.url(&path))).await?;
            println!("policy {name} deleted at revision {}", v["revision"]);
        }
    }
    Ok(())
}

async fn audit(c: &Http, namespace: Option<String>, since: u64, json: bool) -> anyhow::Result<()> {
    let mut q = vec![("since", since.to_string())];
    if let Some(ns) = namespace {
        q.push(("namespace", ns));
    }
    let v = c.send(c.http.get(c.url("/v1/audit")).query(&q)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for e in v["entries"].as_array().into_iter().flatten() {
        println!(
            "{:>8} {} {:<16} {:<5} {:<21} {}",
            e["revision"],
            e["time_ms"],
            e["token_id"].as_str().unwrap_or("-"),
            e["protocol"].as_str().unwrap_or(""),
            e["source"].as_str().unwrap_or(""),
            e["change"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
