//! Privileged end-to-end tests of network policy: real pods, real connections, the real
//! datapath enforcing (or auditing) CiliumNetworkPolicy-shaped YAML loaded by the node
//! exporter, checked by whether connections really succeed and by the flows reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use lumen_lab::{ConnectOutcome, Lab, Pod};
use serde_json::Value;

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p).unwrap_or(&Value::Null);
    }
    cur
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path).as_str().unwrap_or("")
}

/// Names of the policies in a Flow's attribution list (e.g. "ingress_denied_by").
fn attributed(f: &Value, field: &str) -> Vec<String> {
    get(f, &[field])
        .as_array()
        .map(|a| a.iter().map(|p| s(p, &["name"]).to_owned()).collect())
        .unwrap_or_default()
}

const ECHO_SERVER: &str = r#"
import socket, threading, sys
port = int(sys.argv[1])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
srv.listen(64)
def serve(c):
    with c:
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client that keeps one connection open, echoing a line every 100 ms for `secs`;
/// exits 0 only if every echo came back.
const ECHO_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
end = time.time() + float(sys.argv[3])
n = 0
while time.time() < end:
    s.sendall(b"ping\n")
    if s.recv(16) != b"ping\n":
        sys.exit(1)
    n += 1
    time.sleep(0.1)
print(n)
"#;

struct PolicyLab {
    lab: Lab,
    db: Pod,
    api: Pod,
    web: Pod,
    exporter: Exporter,
    policy_dir: tempfile::TempDir,
    _eps_dir: tempfile::TempDir,
    _servers: Vec<lumen_lab::Background>,
}

impl PolicyLab {
    fn new(name: &str) -> PolicyLab {
        let mut lab = Lab::new(name).expect("lab");
        let db = lab.add_pod("db").expect("pod");
        let api = lab.add_pod("api").expect("pod");
        let web = lab.add_pod("web").expect("pod");
        let eps_dir = tempfile::tempdir().unwrap();
        let eps = eps_dir.path().join("endpoints.yaml");
        let mut yaml = String::from("node: policy-node\nendpoints:\n");
        for (p, app) in [(&db, "db"), (&api, "api"), (&web, "web")] {
            yaml.push_str(&format!(
                "  - pod: {app}\n    namespace: prod\n    labels: {{app: {app}}}\n    interface: {}\n    ips: [\"{}\", \"{}\"]\n",
                p.host_if, p.ipv4, p.ipv6
            ));
        }
        std::fs::write(&eps, yaml).unwrap();
        let policy_dir = tempfile::tempdir().unwrap();
        let dir = policy_dir.path().to_str().unwrap().to_owned();
        let exporter = Exporter::start("policy-node", Some(&eps), &["--policy-dir", &dir]);
        wait_attached(
            &[db.host_if.clone(), api.host_if.clone(), web.host_if.clone()],
            Duration::from_secs(10),
        );
        let mut servers = Vec::new();
        let mut echo = db
            .spawn(&["python3", "-c", ECHO_SERVER, "6379"])
            .expect("echo server");
        db.wait_listening(&mut echo, "tcp", 6379)
            .expect("echo listening");
        servers.push(echo);
        servers.push(api.http_server(8080).expect("http"));
        PolicyLab {
            lab,
            db,
            api,
            web,
            exporter,
            policy_dir,
            _eps_dir: eps_dir,
            _servers: servers,
        }
    }

    fn write_policy(&self, file: &str, yaml: &str) {
        // Write beside and rename: the watcher never sees a half-written file.
        let tmp = self.policy_dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.policy_dir.path().join(file)).unwrap();
    }

    fn server(&self) -> &str {
        &self.exporter.server
    }

    fn connect(&self, from: &Pod, to: IpAddr, port: u16) -> ConnectOutcome {
        from.tcp_connect(to, port, Duration::from_millis(800))
            .expect("tcp_connect")
    }

    /// Wait until `check` holds (policy propagation), up to 5 s.
    fn wait_for(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what} did not happen within 5 s: {}", self.exporter.log());
    }

    fn flows(&self, args: &[&str]) -> Vec<Value> {
        let mut a = vec!["--all"];
        a.extend_from_slice(args);
        flows(&observe_json(self.server(), &a))
    }
}

fn db_policy(mode: Option<&str>) -> String {
    let annotations = match mode {
        Some(m) => format!("  annotations:\n    lumen.io/mode: {m}\n"),
        None => String::new(),
    };
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-ingress
  namespace: prod
{annotations}spec:
  endpointSelector:
    matchLabels:
      app: db
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: api
      toPorts:
        - ports:
            - port: "6379"
              protocol: TCP
"#
    )
}

fn assert_text_contains(out: &std::process::Output, needles: &[&str]) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in needles {
        assert!(text.contains(n), "missing {n:?} in:\n{text}");
    }
}

#[test]
fn enforce_drops_what_the_policy_denies_and_names_it() {
    if !lumen_lab::require_privileges("enforce_drops_what_the_policy_denies_and_names_it") {
        return;
    }
    let _g = lab_lock();
    let pl = PolicyLab::new("polenf");
    let db4 = IpAddr::V4(pl.db.ipv4);
    let db6 = IpAddr::V6(pl.db.ipv6);
    // Before any policy: everyone connects.
    assert_eq!(pl.connect(&pl.web, db4, 6379), ConnectOutcome::Connected);
    pl.write_policy("db.yaml", &db_policy(None));
    pl.wait_for("enforcement", || {
        pl.connect(&pl.web, db4, 6379) != ConnectOutcome::Connected
    });
    // web is denied (the connection really fails), api is allowed; IPv4 and IPv6.
    for ip in [db4, db6] {
        assert_eq!(
            pl.connect(&pl.api, ip, 6379),
            ConnectOutcome::Connected,
            "api -> {ip}"
        );
        assert_ne!(
            pl.connect(&pl.web, ip, 6379),
            ConnectOutcome::Connected,
            "web -> {ip}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let dropped = pl.flows(&[
        "--from-pod",
        "prod/web",
        "--to-port",
        "6379",
        "--verdict",
        "DROPPED",
    ]);
    assert!(!dropped.is_empty(), "no DROPPED flow for web -> db");
    for f in &dropped {
        assert_eq!(s(f, &["drop_reason_desc"]), "POLICY_DENIED", "{f}");
        assert_eq!(
            attributed(f, "ingress_denied_by"),
            vec!["db-ingress"],
            "{f}"
        );
        assert_eq!(s(f, &["traffic_direction"]), "INGRESS");
    }
    assert!(
        dropped.iter().any(|f| s(f, &["IP", "ipVersion"]) == "IPv6"),
        "IPv6 drop reported"
    );
    let allowed = pl.flows(&[
        "--from-pod",
        "prod/api",
        "--to-port",
        "6379",
        "--to-pod",
        "prod/db",
    ]);
    let at_db: Vec<&Value> = allowed
        .iter()
        .filter(|f| s(f, &["interface", "name"]) == pl.db.host_if)
        .collect();
    assert!(!at_db.is_empty());
    for f in at_db {
        assert_eq!(s(f, &["verdict"]), "FORWARDED");
        assert_eq!(
            attributed(f, "ingress_allowed_by"),
            vec!["db-ingress"],
            "{f}"
        );
    }
    // The compact output names the deciding policy.
    let compact = lumen(&[
        "observe",
        "--server",
        pl.server(),
        "--all",
        "--verdict",
        "DROPPED",
        "--from-pod",
        "prod/web",
    ]);
    assert_text_contains(&compact, &["DROPPED", "db-ingress"]);
    // Inspection: policies as loaded, the kernel's map in human terms, identities.
    assert_text_contains(
        &lumen(&["policy", "list", "--server", pl.server()]),
        &["prod/db-ingress", "CiliumNetworkPolicy", "inherit"],
    );
    assert_text_contains(
        &lumen(&["policy", "get", "prod/db-ingress", "--server", pl.server()]),
        &["Selects:    1 endpoints", "prod/db"],
    );
    let dump = lumen(&[
        "policy",
        "dump",
        "--endpoint",
        "prod/db",
        "--server",
        pl.server(),
    ]);
    assert_text_contains(
        &dump,
        &[
            "INGRESS",
            "ALLOW",
            "app=api",
            "6379",
            "TCP",
            "db-ingress",
            "DENY",
        ],
    );
    assert_text_contains(
        &lumen(&["identity", "list", "--server", pl.server()]),
        &["reserved:world", "k8s:app=db"],
    );
    let missing = lumen(&["policy", "get", "prod/nope", "--server", pl.server()]);
    assert!(!missing.status.success());
    let _ = &pl.lab;
}

#[test]
fn audit_reports_would_be_denials_and_switching_to_enforce_breaks_nothing_allowed() {
    if !lumen_lab::require_privileges("audit_reports_would_be_denials") {
        return;
    }
    let _g = lab_lock();
    let pl = PolicyLab::new("polaud");
    let db4 = IpAddr::V4(pl.db.ipv4);
    pl.write_policy("db.yaml", &db_policy(Some("audit")));
    pl.wait_for("audit policy loaded", || {
        String::from_utf8_lossy(&lumen(&["policy", "list", "--server", pl.server()]).stdout)
            .contains("db-ingress")
    });
    std::thread::sleep(Duration::from_millis(200));
    // Audit: both connect; web's flow is AUDIT, attributed to the would-be-denying policy.
    assert_eq!(pl.connect(&pl.api, db4, 6379), ConnectOutcome::Connected);
    assert_eq!(pl.connect(&pl.web, db4, 6379), ConnectOutcome::Connected);
    std::thread::sleep(Duration::from_millis(300));
    let audit = pl.flows(&[
        "--from-pod",
        "prod/web",
        "--to-port",
        "6379",
        "--verdict",
        "AUDIT",
    ]);
    assert!(!audit.is_empty(), "no AUDIT flow");
    for f in &audit {
        assert_eq!(
            attributed(f, "ingress_denied_by"),
            vec!["db-ingress"],
            "{f}"
        );
    }
    let api_audit = pl.flows(&["--from-pod", "prod/api", "--verdict", "AUDIT"]);
    assert!(
        api_audit.is_empty(),
        "allowed traffic reported as AUDIT: {api_audit:?}"
    );
    // Hubble's way of watching an audit rollout: `--type policy-verdict` gives each
    // connection's verdict, the would-be denial and the allowed one.
    let verdicts = pl.flows(&["--type", "policy-verdict", "--to-port", "6379"]);
    let verdict_of = |pod: &str| {
        verdicts
            .iter()
            .filter(|f| {
                f["source"]["pod_name"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(pod))
            })
            .map(|f| f["verdict"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        verdict_of("web").contains(&"AUDIT".to_owned()),
        "{verdicts:?}"
    );
    assert!(
        verdict_of("api").contains(&"FORWARDED".to_owned()),
        "{verdicts:?}"
    );
    assert!(
        verdicts.iter().all(|f| f["lumen_event_kind"] == "FLOW_NEW"),
        "only connections' first records: {verdicts:?}"
    );

    // Switch to enforce while an allowed connection is busy: it must not break.
    let api = pl.api.clone();
    let db_ip = pl.db.ipv4.to_string();
    let client =
        std::thread::spawn(move || api.exec(&["python3", "-c", ECHO_CLIENT, &db_ip, "6379", "3"]));
    std::thread::sleep(Duration::from_millis(1000));
    pl.write_policy("db.yaml", &db_policy(None));
    let out = client.join().unwrap().expect("echo client");
    assert!(
        out.status.success(),
        "allowed connection broke across the switch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first denied attempt after the switch is dropped.
    pl.wait_for("enforcement after the switch", || {
        pl.connect(&pl.web, db4, 6379) != ConnectOutcome::Connected
    });
    std::thread::sleep(Duration::from_millis(300));
    let dropped = pl.flows(&[
        "--from-pod",
        "prod/web",
        "--to-port",
        "6379",
        "--verdict",
        "DROPPED",
    ]);
    assert!(!dropped.is_empty());
}

#[test]
fn egress_deny_and_cidr_rules() {
    if !lumen_lab::require_privileges("egress_deny_and_cidr_rules") {
        return;
    }
    let _g = lab_lock();
    let pl = PolicyLab::new("polegr");
    let bridge4 = pl.lab.bridge_ipv4();
    let policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-egress
  namespace: prod
spec:
  endpointSelector:
    matchLabels:
      app: web
  egress:
    - toEndpoints:
        - matchLabels:
            app: api
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
    - toCIDR:
        - {bridge4}/32
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-deny-web
  namespace: prod
spec:
  endpointSelector:
    matchLabels:
      app: db
  ingress:
    - fromEndpoints:
        - {{}}
  ingressDeny:
    - fromEndpoints:
        - matchLabels:
            app: web
"#
    );
    pl.write_policy("rules.yaml", &policy);
    let db4 = IpAddr::V4(pl.db.ipv4);
    let api4 = IpAddr::V4(pl.api.ipv4);
    pl.wait_for("egress enforcement", || {
        pl.connect(&pl.web, db4, 6379) != ConnectOutcome::Connected
    });
    // Allowed egress: web -> api:8080 (v4 and v6) and the CIDR (the bridge address).
    assert_eq!(pl.connect(&pl.web, api4, 8080), ConnectOutcome::Connected);
    assert_eq!(
        pl.connect(&pl.web, IpAddr::V6(pl.api.ipv6), 8080),
        ConnectOutcome::Connected
    );
    assert!(
        pl.web
            .ping(IpAddr::V4(bridge4), 1)
            .expect("ping")
            .all_answered(),
        "toCIDR allows the bridge"
    );
    // Not allowed: web -> api on another port, web -> db (egress default deny at web).
    assert_ne!(pl.connect(&pl.web, api4, 6379), ConnectOutcome::Connected);
    // The explicit deny on db: api -> db is allowed by `fromEndpoints: [{}]`.
    assert_eq!(pl.connect(&pl.api, db4, 6379), ConnectOutcome::Connected);
    std::thread::sleep(Duration::from_millis(300));
    let egress_drops = pl.flows(&[
        "--from-pod",
        "prod/web",
        "--verdict",
        "DROPPED",
        "--traffic-direction",
        "egress",
    ]);
    assert!(!egress_drops.is_empty());
    assert!(
        egress_drops
            .iter()
            .all(|f| attributed(f, "egress_denied_by") == vec!["web-egress"]),
        "{egress_drops:?}"
    );
    // db's explicit deny decides at db's interface with POLICY_DENY (181) when web's egress
    // is opened up: allow web everything on egress and retry.
    let open_egress = policy.replace(
        "    - toCIDR:\n",
        "    - toEndpoints:\n        - matchLabels:\n            app: db\n    - toCIDR:\n",
    );
    pl.write_policy("rules.yaml", &open_egress);
    std::thread::sleep(Duration::from_millis(800));
    assert_ne!(pl.connect(&pl.web, db4, 6379), ConnectOutcome::Connected);
    std::thread::sleep(Duration::from_millis(300));
    let denied = pl.flows(&[
        "--from-pod",
        "prod/web",
        "--to-pod",
        "prod/db",
        "--verdict",
        "DROPPED",
        "--traffic-direction",
        "ingress",
    ]);
    assert!(
        denied
            .iter()
            .any(|f| s(f, &["drop_reason_desc"]) == "POLICY_DENY"
                && attributed(f, "ingress_denied_by") == vec!["db-deny-web"]),
        "explicit deny reported: {denied:?}"
    );
}

#[test]
fn a_bad_policy_file_keeps_the_previous_policy_in_force() {
    if !lumen_lab::require_privileges("a_bad_policy_file_keeps_the_previous_policy_in_force") {
        return;
    }
    let _g = lab_lock();
    let pl = PolicyLab::new("polbad");
    let db4 = IpAddr::V4(pl.db.ipv4);
    pl.write_policy("db.yaml", &db_policy(None));
    pl.wait_for("enforcement", || {
        pl.connect(&pl.web, db4, 6379) != ConnectOutcome::Connected
    });
    let bad_cases = [
        ("unknown field", db_policy(None).replace("  ingress:\n", "  ingresss:\n"), "ingresss"),
        ("L7 rules", db_policy(None).replace("              protocol: TCP\n", "              protocol: TCP\n          rules:\n            http:\n              - method: GET\n"), "rules"),
        ("port out of range", db_policy(None).replace("\"6379\"", "\"70000\""), "70000"),
        ("bad selector operator", db_policy(None).replace("        - matchLabels:\n            app: api\n", "        - matchExpressions:\n            - key: app\n              operator: Sometimes\n              values: [api]\n"), "Sometimes"),
    ];
    let mut errors_before = pl.exporter.metric("lumen_policy_reload_errors_total", "");
    for (what, yaml, needle) in bad_cases {
        pl.write_policy("db.yaml", &yaml);
        pl.wait_for(what, || {
            pl.exporter.metric("lumen_policy_reload_errors_total", "") > errors_before
        });
        errors_before = pl.exporter.metric("lumen_policy_reload_errors_total", "");
        let log = pl.exporter.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("rejected policy file"))
            .unwrap_or_default();
        assert!(
            line.contains("db.yaml") && line.contains("document 1") && line.contains(needle),
            "{what}: {line}"
        );
        // The previous policy is still enforced.
        assert_ne!(
            pl.connect(&pl.web, db4, 6379),
            ConnectOutcome::Connected,
            "{what}"
        );
        assert_eq!(
            pl.connect(&pl.api, db4, 6379),
            ConnectOutcome::Connected,
            "{what}"
        );
    }
    let _ = Path::new("");
}
