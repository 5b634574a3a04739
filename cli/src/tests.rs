//! Command line -> GetFlowsRequest translation, checked against what Hubble
//! sends for the same flags.

use chrono::{TimeZone, Utc};
use lumen_proto::flow::{
    EventTypeFilter, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict,
};
use lumen_proto::observer::GetFlowsRequest;

use crate::request::DEFAULT_LAST;
use crate::{build_request, parse, Command, Parsed};

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn request(args: &[&str]) -> GetFlowsRequest {
    let mut argv = vec!["lumen", "observe"];
    argv.extend_from_slice(args);
    let Parsed::Run(inv) = parse(argv).expect("parses") else {
        panic!("expected a command to run");
    };
    let Command::Observe(obs) = &inv.cli.command else {
        panic!("expected observe");
    };
    build_request(obs, &inv.filter_flags, now()).expect("builds")
}

fn request_err(args: &[&str]) -> String {
    let mut argv = vec!["lumen", "observe"];
    argv.extend_from_slice(args);
    match parse(argv) {
        Err(e) => e.to_string(),
        Ok(Parsed::Run(inv)) => {
            let Command::Observe(obs) = &inv.cli.command else {
                panic!("expected observe");
            };
            build_request(obs, &inv.filter_flags, now())
                .expect_err("should fail")
                .to_string()
        }
        Ok(Parsed::Display(_)) => panic!("unexpected help"),
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[test]
fn defaults_to_last_20() {
    let r = request(&[]);
    assert_eq!(r.number, 20);
    assert!(!r.first && !r.follow);
    assert!(r.whitelist.is_empty() && r.blacklist.is_empty());
    assert!(r.since.is_none() && r.until.is_none() && r.field_mask.is_none());
}

#[test]
fn counts_and_follow() {
    assert_eq!(request(&["--last", "5"]).number, 5);
    let r = request(&["--first", "7"]);
    assert_eq!((r.number, r.first), (7, true));
    assert_eq!(request(&["--all"]).number, u64::MAX);
    let r = request(&["-f"]);
    assert_eq!((r.number, r.follow), (0, true));
    let r = request(&["--follow", "--last", "3"]);
    assert_eq!((r.number, r.follow), (3, true));
}

#[test]
fn since_until_absolute_and_relative() {
    let r = request(&["--since", "5m", "--until", "2024-05-01T11:58:00Z"]);
    assert_eq!(
        r.number, 0,
        "a time range without a count returns the whole range"
    );
    let since = r.since.expect("since");
    assert_eq!(since.seconds, now().timestamp() - 300);
    assert_eq!(r.until.expect("until").seconds, now().timestamp() - 120);
    let r = request(&["--since", "1h30m ago"]);
    assert_eq!(r.since.expect("since").seconds, now().timestamp() - 5400);
}

#[test]
fn from_and_to_flags_share_one_filter() {
    let r = request(&[
        "--from-ip",
        "10.0.0.1",
        "--to-port",
        "80",
        "--verdict",
        "dropped",
        "--protocol",
        "TCP",
    ]);
    assert_eq!(
        r.whitelist,
        vec![FlowFilter {
            source_ip: s(&["10.0.0.1"]),
            destination_port: s(&["80"]),
            verdict: vec![Verdict::Dropped as i32],
            protocol: s(&["tcp"]),
            ..Default::default()
        }]
    );
}

#[test]
fn either_side_flags_make_two_filters() {
    let r = request(&["--ip", "10.0.0.1", "--verdict", "FORWARDED"]);
    assert_eq!(
        r.whitelist,
        vec![
            FlowFilter {
                source_ip: s(&["10.0.0.1"]),
                verdict: vec![Verdict::Forwarded as i32],
                ..Default::default()
            },
            FlowFilter {
                destination_ip: s(&["10.0.0.1"]),
                verdict: vec![Verdict::Forwarded as i32],
                ..Default::default()
            },
        ]
    );
    let r = request(&[
        "--pod",
        "prod/web",
        "--port",
        "443",
        "-l",
        "app=web",
        "--identity",
        "42",
    ]);
    assert_eq!(
        r.whitelist,
        vec![
            FlowFilter {
                source_pod: s(&["prod/web"]),
                source_port: s(&["443"]),
                source_label: s(&["app=web"]),
                source_identity: vec![42],
                ..Default::default()
            },
            FlowFilter {
                destination_pod: s(&["prod/web"]),
                destination_port: s(&["443"]),
                destination_label: s(&["app=web"]),
                destination_identity: vec![42],
                ..Default::default()
            },
        ]
    );
}

#[test]
fn namespaces_and_pods() {
    let r = request(&["--from-namespace", "prod", "--to-namespace", "db"]);
    assert_eq!(r.whitelist[0].source_pod, s(&["prod/"]));
    assert_eq!(r.whitelist[0].destination_pod, s(&["db/"]));
    assert_eq!(r.whitelist.len(), 1);
    // A pod without namespace takes its side's namespace flag, else "default".
    let r = request(&["--from-pod", "web", "--from-namespace", "prod"]);
    assert_eq!(
        r.whitelist,
        vec![FlowFilter {
            source_pod: s(&["prod/web"]),
            ..Default::default()
        }]
    );
    let r = request(&["--to-pod", "db"]);
    assert_eq!(r.whitelist[0].destination_pod, s(&["default/db"]));
    let r = request(&["--namespace", "kube-system"]);
    assert_eq!(r.whitelist.len(), 2);
    assert_eq!(r.whitelist[0].source_pod, s(&["kube-system/"]));
    assert_eq!(r.whitelist[1].destination_pod, s(&["kube-system/"]));
}

#[test]
fn not_moves_the_next_filter_to_the_blacklist() {
    let r = request(&[
        "--from-namespace",
        "prod",
        "--not",
        "--to-port",
        "53",
        "--verdict",
        "DROPPED",
    ]);
    assert_eq!(
        r.whitelist,
        vec![FlowFilter {
            source_pod: s(&["prod/"]),
            verdict: vec![Verdict::Dropped as i32],
            ..Default::default()
        }]
    );
    assert_eq!(
        r.blacklist,
        vec![FlowFilter {
            destination_port: s(&["53"]),
            ..Default::default()
        }]
    );
    let r = request(&["--not", "--ip", "10.0.0.1"]);
    assert!(r.whitelist.is_empty());
    assert_eq!(r.blacklist.len(), 2);
    let r = request(&["--not", "-4"]);
    assert_eq!(
        r.blacklist,
        vec![FlowFilter {
            ip_version: vec![IpVersion::IPv4 as i32],
            ..Default::default()
        }]
    );
}

#[test]
fn flags_types_directions_nodes_ip_versions() {
    let r = request(&[
        "--tcp-flags",
        "SYN",
        "--tcp-flags",
        "syn,ack",
        "--traffic-direction",
        "ingress",
        "--node-name",
        "node-*",
        "--type",
        "drop",
        "--type",
        "trace:to-endpoint",
        "-6",
        "--from-identity",
        "7",
        "--to-identity",
        "8",
        "--from-label",
        "k8s:app in (a,b)",
    ]);
    let f = &r.whitelist[0];
    assert_eq!(r.whitelist.len(), 1);
    assert_eq!(
        f.tcp_flags,
        vec![
            TcpFlags {
                syn: true,
                ..Default::default()
            },
            TcpFlags {
                syn: true,
                ack: true,
                ..Default::default()
            }
        ]
    );
    assert_eq!(f.traffic_direction, vec![TrafficDirection::Ingress as i32]);
    assert_eq!(f.node_name, s(&["node-*"]));
    assert_eq!(
        f.event_type,
        vec![
            EventTypeFilter {
                r#type: 1,
                match_sub_type: false,
                sub_type: 0
            },
            EventTypeFilter {
                r#type: 4,
                match_sub_type: true,
                sub_type: 0
            },
        ]
    );
    assert_eq!(f.ip_version, vec![IpVersion::IPv6 as i32]);
    assert_eq!(
        (f.source_identity.clone(), f.destination_identity.clone()),
        (vec![7], vec![8])
    );
    assert_eq!(f.source_label, s(&["k8s:app in (a,b)"]));
}

#[test]
fn field_mask_flag() {
    let r = request(&[
        "--field-mask",
        "time,verdict",
        "--field-mask",
        "source.pod_name",
    ]);
    assert_eq!(
        r.field_mask.expect("mask").paths,
        s(&["time", "verdict", "source.pod_name"])
    );
}

#[test]
fn invalid_flag_values() {
    for (args, want) in [
        (&["--verdict", "MAYBE"][..], "--verdict"),
        (&["--to-port", "http"][..], "--to-port"),
        (&["--tcp-flags", "SYN,FOO"][..], "--tcp-flags"),
        (&["--traffic-direction", "up"][..], "--traffic-direction"),
        (&["--type", "nope"][..], "--type"),
        (&["--since", "last tuesday"][..], "--since"),
        (&["--identity", "abc"][..], "--identity"),
        (&["--first", "1", "--follow"][..], "--first"),
    ] {
        let e = request_err(args);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains('\n'), "{args:?}: {e}");
    }
}

#[test]
fn server_address_forms() {
    use crate::commands::server_uri;
    assert_eq!(server_uri("localhost:4244", false), "http://localhost:4244");
    assert_eq!(
        server_uri("http://10.0.0.1:4245", false),
        "http://10.0.0.1:4245"
    );
    // TLS: a bare host:port becomes https://; an explicit scheme is kept.
    assert_eq!(server_uri("localhost:4244", true), "https://localhost:4244");
    assert_eq!(
        server_uri("https://relay.example:443", true),
        "https://relay.example:443"
    );
}

fn tls_args(args: &[&str]) -> crate::args::TlsArgs {
    let mut argv = vec!["lumen"];
    argv.extend_from_slice(args);
    let Parsed::Run(inv) = parse(argv).expect("parses") else {
        panic!("expected a command to run");
    };
    inv.cli.tls
}

#[test]
fn tls_flags_are_global_with_hubble_forms() {
    let t = tls_args(&[
        "--tls",
        "status",
        "--tls-ca-cert-files",
        "a.pem,b.pem",
        "--tls-ca-cert-files",
        "c.pem",
        "--tls-client-cert-file",
        "cli.pem",
        "--tls-client-key-file",
        "cli-key.pem",
        "--tls-server-name",
        "relay.lab",
    ]);
    assert!(t.tls && !t.tls_allow_insecure);
    let cas: Vec<String> = t
        .tls_ca_cert_files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(cas, s(&["a.pem", "b.pem", "c.pem"]));
    assert_eq!(
        t.tls_client_cert_file.as_deref(),
        Some(std::path::Path::new("cli.pem"))
    );
    assert_eq!(t.tls_server_name.as_deref(), Some("relay.lab"));

    // Booleans take an optional =value, as cobra's do; a bare flag never eats the next word.
    assert!(!tls_args(&["observe", "--tls=false"]).tls);
    assert!(tls_args(&["observe", "--tls-allow-insecure"]).tls_allow_insecure);
    assert!(tls_args(&["--tls", "nodes"]).tls);
    assert!(!tls_args(&["nodes"]).tls);
}

#[test]
fn last_or_first_zero_is_hubbles_default() {
    // Hubble's getFlowsRequest: a zero count is no count; without --follow or a time
    // range that means the last 20.
    assert_eq!(request(&["--last", "0"]).number, DEFAULT_LAST);
    let r = request(&["--first", "0"]);
    assert_eq!((r.number, r.first), (DEFAULT_LAST, false));
    let r = request(&["--last", "0", "--follow"]);
    assert_eq!((r.number, r.follow), (0, true));
    assert_eq!(request(&["--last", "0", "--since", "5m"]).number, 0);
}

#[test]
fn since_after_until_is_caught_with_readable_times() {
    let e = request_err(&[
        "--since",
        "2024-05-01T12:00:00Z",
        "--until",
        "2024-05-01T11:00:00Z",
    ]);
    assert_eq!(
        e,
        "--since 2024-05-01T12:00:00Z is after --until 2024-05-01T11:00:00Z"
    );
    // Relative times are anchored at now (12:00:00).
    assert_eq!(
        request_err(&["--since", "1m", "--until", "2m"]),
        "--since 2024-05-01T11:59:00Z is after --until 2024-05-01T11:58:00Z"
    );
    // Within one second, the fraction tells them apart.
    assert_eq!(
        request_err(&[
            "--since",
            "2024-05-01T12:00:00.5Z",
            "--until",
            "2024-05-01T12:00:00.25Z"
        ]),
        "--since 2024-05-01T12:00:00.500Z is after --until 2024-05-01T12:00:00.250Z"
    );
    // Equal bounds are a valid (one-instant) range.
    request(&[
        "--since",
        "2024-05-01T12:00:00Z",
        "--until",
        "2024-05-01T12:00:00Z",
    ]);
}

#[test]
fn filter_values_are_checked_by_flag() {
    for (args, want) in [
        (
            &["--ip", "notanip"][..],
            r#"invalid value "notanip" for --ip: not an IP address"#,
        ),
        (
            &["--verdict", "DROPPED", "--to-ip", "10.0.0.0/33"][..],
            r#"invalid value "10.0.0.0/33" for --to-ip: not a CIDR"#,
        ),
        (
            &["--not", "--from-ip", "10.0.0.300"][..],
            r#"invalid value "10.0.0.300" for --from-ip"#,
        ),
        (
            &["-l", "app in (a"][..],
            r#"invalid value "app in (a" for --label: "#,
        ),
        (
            &["--to-label", "!!"][..],
            r#"invalid value "!!" for --to-label: "#,
        ),
        (
            &["--protocol", "foo"][..],
            r#"invalid value "foo" for --protocol: expected one of tcp"#,
        ),
        (
            &["--node-name", "a/b/c"][..],
            r#"invalid value "a/b/c" for --node-name: "#,
        ),
        (
            &["--from-pod", "a/b/c"][..],
            r#"invalid value "a/b/c" for --from-pod: "#,
        ),
        (
            &["--to-namespace", ""][..],
            r#"invalid value "" for --to-namespace: "#,
        ),
    ] {
        let e = request_err(args);
        assert!(e.starts_with(want), "{args:?}: {e}");
        assert!(!e.contains("source_") && !e.contains("destination_"), "{e}");
    }
    // Valid values of the same flags pass.
    request(&[
        "--ip",
        "fd00::1",
        "--to-ip",
        "10.0.0.0/8",
        "-l",
        "app in (a,b)",
        "--protocol",
        "ICMPv6",
        "--node-name",
        "cluster/node-*",
    ]);
}

#[test]
fn clap_errors_keep_what_they_list() {
    let usage = |args: &[&str]| match parse(args.iter().copied()) {
        Err(crate::CliError::Usage(m)) => m,
        other => panic!("{args:?}: expected a usage error, got {other:?}"),
    };
    assert_eq!(
        usage(&["lumen", "policy", "dump"]),
        "the following required arguments were not provided: --endpoint <ENDPOINT> \
         (see 'lumen policy dump --help')"
    );
    assert_eq!(
        usage(&["lumen", "observe", "--verdit", "DROPPED"]),
        "unexpected argument '--verdit' found (tip: a similar argument exists: '--verdict') \
         (see 'lumen observe --help')"
    );
    assert_eq!(
        usage(&["lumen", "observe", "--bogus"]),
        "unexpected argument '--bogus' found (see 'lumen observe --help')"
    );
    let e = usage(&["lumen", "observe", "--last", "many"]);
    assert!(
        e.starts_with("invalid value 'many' for '--last <N>': "),
        "{e}"
    );
    let e = usage(&["lumen", "status", "--timeout", "soon"]);
    assert!(
        e.starts_with("invalid value 'soon' for '--timeout <TIMEOUT>': invalid duration"),
        "{e}"
    );
    assert!(usage(&["lumen", "frobnicate"]).starts_with("unrecognized subcommand 'frobnicate'"),);
    assert!(usage(&["lumen", "observe", "--first", "1", "--follow"])
        .starts_with("the argument '--first <N>' cannot be used with '--follow'"),);
}

#[test]
fn unimplemented_calls_say_what_and_why() {
    use crate::commands::{status_error, Call};
    let e = status_error(
        "relay:4245",
        Call::POLICIES,
        tonic::Status::unimplemented(""),
    );
    assert_eq!(
        e.to_string(),
        "relay:4245 does not serve policies (PolicyInspector.ListPolicies) \
         (a relay? policies and identities are per node: use --server <node>:4244)"
    );
    let e = status_error(
        "node:4244",
        Call::NODES,
        tonic::Status::unimplemented("namespaces"),
    );
    assert_eq!(
        e.to_string(),
        "node:4244 does not serve the node list (Observer.GetNodes): namespaces"
    );
}
