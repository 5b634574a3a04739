use super::*;
use crate::flow::{
    flow_filter::Experimental, layer4, CiliumEventType, DropReason, HttpHeader, Ip, IpVersion,
    Layer4, Tcp, TrafficDirection, Udp,
};

fn ep(ns: &str, pod: &str, identity: u32, labels: &[&str]) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        pod_name: pod.into(),
        identity,
        labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// web (10.0.1.5:43210, prod) -> db (10.0.2.7:5432, prod), TCP SYN, forwarded egress.
fn web_to_db() -> Flow {
    Flow {
        verdict: Verdict::Forwarded as i32,
        ip: Some(Ip {
            source: "10.0.1.5".into(),
            destination: "10.0.2.7".into(),
            ip_version: IpVersion::IPv4 as i32,
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 43210,
                destination_port: 5432,
                flags: Some(TcpFlags {
                    syn: true,
                    ..Default::default()
                }),
            })),
        }),
        source: Some(ep(
            "prod",
            "web-7d9f-abc",
            1234,
            &["k8s:app=web", "k8s:tier=front"],
        )),
        destination: Some(ep("prod", "db-0", 5678, &["k8s:app=db", "k8s:tier=back"])),
        node_name: "lab/node-1".into(),
        traffic_direction: TrafficDirection::Egress as i32,
        event_type: Some(CiliumEventType {
            r#type: 4,
            sub_type: 0,
        }),
        ..Default::default()
    }
}

/// A dropped UDP IPv6 flow from outside to the dns pod in kube-system.
fn world_to_dns() -> Flow {
    Flow {
        verdict: Verdict::Dropped as i32,
        drop_reason_desc: crate::flow::DropReason::PolicyDenied as i32,
        ip: Some(Ip {
            source: "2001:db8::1".into(),
            destination: "fd00::53".into(),
            ip_version: IpVersion::IPv6 as i32,
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Udp(Udp {
                source_port: 5353,
                destination_port: 53,
            })),
        }),
        source: Some(ep("", "", 2, &["reserved:world"])),
        destination: Some(ep(
            "kube-system",
            "coredns-1",
            99,
            &["k8s:k8s-app=kube-dns"],
        )),
        node_name: "node-2".into(),
        traffic_direction: TrafficDirection::Ingress as i32,
        event_type: Some(CiliumEventType {
            r#type: 1,
            sub_type: 133,
        }),
        ..Default::default()
    }
}

fn one(f: FlowFilter) -> FlowFilters {
    FlowFilters::compile(&[f], &[]).expect("filter compiles")
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn empty_filters_pass_everything() {
    let f = FlowFilters::compile(&[], &[]).expect("compiles");
    assert!(f.matches(&web_to_db()) && f.matches(&world_to_dns()));
    assert!(one(FlowFilter::default()).matches(&web_to_db()));
}

#[test]
fn verdict() {
    let f = one(FlowFilter {
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    assert!(f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        verdict: vec![Verdict::Dropped as i32, Verdict::Forwarded as i32],
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && f.matches(&world_to_dns()));
}

#[test]
fn ips_and_cidrs() {
    let f = one(FlowFilter {
        source_ip: strs(&["10.0.1.5"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    let f = one(FlowFilter {
        source_ip: strs(&["10.0.2.7"]),
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    let f = one(FlowFilter {
        destination_ip: strs(&["10.0.2.0/24"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    let f = one(FlowFilter {
        destination_ip: strs(&["10.0.3.0/24", "fd00::/64"]),
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    assert!(f.matches(&world_to_dns()));
    // Host bits in a CIDR are ignored, like net.ParseCIDR.
    let f = one(FlowFilter {
        source_ip: strs(&["10.0.1.77/16"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
}

#[test]
fn pods_and_namespaces() {
    let f = one(FlowFilter {
        source_pod: strs(&["prod/web-"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    let f = one(FlowFilter {
        source_pod: strs(&["staging/web-"]),
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    let f = one(FlowFilter {
        destination_pod: strs(&["kube-system/"]),
        ..Default::default()
    });
    assert!(f.matches(&world_to_dns()) && !f.matches(&web_to_db()));
    // Without a namespace: a pod-name prefix in any namespace.
    let f = one(FlowFilter {
        destination_pod: strs(&["db"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    // The world endpoint has no pod, so a pod prefix never matches it.
    let f = one(FlowFilter {
        source_pod: strs(&["w"]),
        ..Default::default()
    });
    assert!(!f.matches(&world_to_dns()) && f.matches(&web_to_db()));
}

#[test]
fn labels() {
    let cases: &[(&str, bool)] = &[
        ("app=web", true),
        ("k8s:app=web", true),
        ("k8s.app=web", true),
        ("reserved:app=web", false),
        ("app==web", true),
        ("app=db", false),
        ("app!=db", true),
        ("app in (web, api)", true),
        ("app notin (web,api)", false),
        ("app", true),
        ("!app", false),
        ("!missing", true),
        ("missing!=x", true),
        ("app=web,tier=front", true),
        ("app=web,tier=back", false),
        ("app in (db),tier=front", false),
    ];
    for (sel, want) in cases {
        let f = one(FlowFilter {
            source_label: strs(&[sel]),
            ..Default::default()
        });
        assert_eq!(f.matches(&web_to_db()), *want, "selector {sel:?}");
    }
    // Several selectors in one field: OR.
    let f = one(FlowFilter {
        destination_label: strs(&["app=nope", "tier=back"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    // Value-less reserved labels.
    let f = one(FlowFilter {
        source_label: strs(&["reserved:world"]),
        ..Default::default()
    });
    assert!(f.matches(&world_to_dns()) && !f.matches(&web_to_db()));
}

#[test]
fn ports_and_protocols() {
    let f = one(FlowFilter {
        destination_port: strs(&["5432"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && !f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        source_port: strs(&["5353", "1"]),
        ..Default::default()
    });
    assert!(f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        protocol: strs(&["TCP"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && !f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        protocol: strs(&["udp", "icmp"]),
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));
    let mut ping = web_to_db();
    ping.l4 = Some(Layer4 {
        protocol: Some(layer4::Protocol::IcmPv6(crate::flow::IcmPv6 {
            r#type: 128,
            code: 0,
        })),
    });
    assert!(one(FlowFilter {
        protocol: strs(&["icmp"]),
        ..Default::default()
    })
    .matches(&ping));
    assert!(one(FlowFilter {
        protocol: strs(&["icmpv6"]),
        ..Default::default()
    })
    .matches(&ping));
    assert!(!one(FlowFilter {
        protocol: strs(&["icmpv4"]),
        ..Default::default()
    })
    .matches(&ping));
}

#[test]
fn tcp_flags() {
    let syn = TcpFlags {
        syn: true,
        ..Default::default()
    };
    let syn_ack = TcpFlags {
        syn: true,
        ack: true,
        ..Default::default()
    };
    let fin = TcpFlags {
        fin: true,
        ..Default::default()
    };
    let f = one(FlowFilter {
        tcp_flags: vec![syn],
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    // All flags of one TCPFlags must be present.
    let f = one(FlowFilter {
        tcp_flags: vec![syn_ack],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    // Several TCPFlags: OR.
    let f = one(FlowFilter {
        tcp_flags: vec![fin, syn],
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    // Non-TCP flows never match a TCP-flags filter.
    assert!(!f.matches(&world_to_dns()));
}

#[test]
fn direction_node_event_type_ip_version_identity() {
    let f = one(FlowFilter {
        traffic_direction: vec![TrafficDirection::Ingress as i32],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));

    let f = one(FlowFilter {
        node_name: strs(&["node-*"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        node_name: strs(&["lab/"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && !f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        node_name: strs(&["default/node-2"]),
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        node_name: strs(&["node-1"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
    let f = one(FlowFilter {
        node_name: strs(&["node"]),
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));

    let drop = EventTypeFilter {
        r#type: 1,
        ..Default::default()
    };
    let f = one(FlowFilter {
        event_type: vec![drop],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));
    let trace_from_ep = EventTypeFilter {
        r#type: 4,
        match_sub_type: true,
        sub_type: 5,
    };
    let f = one(FlowFilter {
        event_type: vec![trace_from_ep],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    let trace_to_ep = EventTypeFilter {
        r#type: 4,
        match_sub_type: true,
        sub_type: 0,
    };
    assert!(one(FlowFilter {
        event_type: vec![trace_to_ep],
        ..Default::default()
    })
    .matches(&web_to_db()));

    let f = one(FlowFilter {
        ip_version: vec![IpVersion::IPv6 as i32],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));

    let f = one(FlowFilter {
        source_identity: vec![1234],
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && !f.matches(&world_to_dns()));
    let f = one(FlowFilter {
        destination_identity: vec![1, 99],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));
}

#[test]
fn fields_of_one_filter_and() {
    let f = one(FlowFilter {
        source_pod: strs(&["prod/"]),
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    });
    assert!(
        !f.matches(&web_to_db()),
        "namespace matches but verdict does not"
    );
    let f = one(FlowFilter {
        source_pod: strs(&["prod/"]),
        destination_port: strs(&["5432"]),
        protocol: strs(&["tcp"]),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()));
}

#[test]
fn whitelist_or_and_blacklist() {
    let prod = FlowFilter {
        source_pod: strs(&["prod/"]),
        ..Default::default()
    };
    let dns = FlowFilter {
        destination_port: strs(&["53"]),
        ..Default::default()
    };
    let f = FlowFilters::compile(&[prod.clone(), dns.clone()], &[]).expect("compiles");
    assert!(f.matches(&web_to_db()) && f.matches(&world_to_dns()));

    let f = FlowFilters::compile(&[prod.clone(), dns.clone()], std::slice::from_ref(&dns))
        .expect("compiles");
    assert!(f.matches(&web_to_db()) && !f.matches(&world_to_dns()));

    // Blacklist only: everything but the blacklisted.
    let f = FlowFilters::compile(&[], &[prod]).expect("compiles");
    assert!(!f.matches(&web_to_db()) && f.matches(&world_to_dns()));

    // Non-flow responses always pass.
    let lost = GetFlowsResponse {
        response_types: Some(
            crate::observer::get_flows_response::ResponseTypes::LostEvents(Default::default()),
        ),
        ..Default::default()
    };
    assert!(FlowFilters::compile(&[dns], &[])
        .expect("compiles")
        .matches_response(&lost));
}

#[test]
fn invalid_values_name_field_and_value() {
    let cases: Vec<(FlowFilter, &str, &str)> = vec![
        (
            FlowFilter {
                source_ip: strs(&["10.0.0.0/33"]),
                ..Default::default()
            },
            "source_ip",
            "10.0.0.0/33",
        ),
        (
            FlowFilter {
                destination_ip: strs(&["not-an-ip"]),
                ..Default::default()
            },
            "destination_ip",
            "not-an-ip",
        ),
        (
            FlowFilter {
                source_label: strs(&["app in (a"]),
                ..Default::default()
            },
            "source_label",
            "app in (a",
        ),
        (
            FlowFilter {
                destination_label: strs(&["app=we b"]),
                ..Default::default()
            },
            "destination_label",
            "app=we b",
        ),
        (
            FlowFilter {
                source_label: strs(&["=x"]),
                ..Default::default()
            },
            "source_label",
            "=x",
        ),
        (
            FlowFilter {
                node_name: strs(&["node[1]"]),
                ..Default::default()
            },
            "node_name",
            "node[1]",
        ),
        (
            FlowFilter {
                node_name: strs(&["a/b/c"]),
                ..Default::default()
            },
            "node_name",
            "a/b/c",
        ),
        (
            FlowFilter {
                destination_port: strs(&["70000"]),
                ..Default::default()
            },
            "destination_port",
            "70000",
        ),
        (
            FlowFilter {
                source_port: strs(&["http"]),
                ..Default::default()
            },
            "source_port",
            "http",
        ),
        (
            FlowFilter {
                protocol: strs(&["quic"]),
                ..Default::default()
            },
            "protocol",
            "quic",
        ),
        (
            FlowFilter {
                source_pod: strs(&["/web"]),
                ..Default::default()
            },
            "source_pod",
            "/web",
        ),
        (
            FlowFilter {
                verdict: vec![42],
                ..Default::default()
            },
            "verdict",
            "42",
        ),
        (
            FlowFilter {
                http_status_code: strs(&["4x"]),
                ..Default::default()
            },
            "http_status_code",
            "4x",
        ),
    ];
    for (filter, field, value) in cases {
        let err = FlowFilters::compile(&[], &[filter]).expect_err(value);
        assert!(
            matches!(&err, FilterError::Invalid { field: f, value: v, .. } if *f == field && v == value),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(field) && msg.contains(value), "{msg}");
    }
}

#[test]
fn drop_reason_desc_matches_dropped_flows_with_a_listed_reason() {
    let f = one(FlowFilter {
        drop_reason_desc: vec![
            DropReason::PolicyDeny as i32,
            DropReason::PolicyDenied as i32,
        ],
        ..Default::default()
    });
    assert!(f.matches(&world_to_dns()), "dropped with POLICY_DENIED");
    assert!(!f.matches(&web_to_db()), "forwarded");
    let f = one(FlowFilter {
        drop_reason_desc: vec![DropReason::PolicyDeny as i32],
        ..Default::default()
    });
    assert!(!f.matches(&world_to_dns()), "dropped for another reason");
    // Hubble looks at the reason of dropped flows only.
    let not_dropped = Flow {
        verdict: Verdict::Forwarded as i32,
        ..world_to_dns()
    };
    let f = one(FlowFilter {
        drop_reason_desc: vec![DropReason::PolicyDenied as i32],
        ..Default::default()
    });
    assert!(!f.matches(&not_dropped));
    // UNENCRYPTED_TRAFFIC (195) is in Hubble's enum, not Lumen's: accepted, matches nothing.
    let f = one(FlowFilter {
        drop_reason_desc: vec![195],
        ..Default::default()
    });
    assert!(!f.matches(&world_to_dns()) && !f.matches(&web_to_db()));
    // Under --not: every flow but the POLICY_DENIED drop.
    let deny = FlowFilter {
        drop_reason_desc: vec![DropReason::PolicyDenied as i32],
        ..Default::default()
    };
    let f = FlowFilters::compile(&[], &[deny]).expect("compiles");
    assert!(f.matches(&web_to_db()) && !f.matches(&world_to_dns()));
}

fn on_interface(index: u32, name: &str) -> Flow {
    Flow {
        interface: Some(NetworkInterface {
            index,
            name: name.into(),
        }),
        ..web_to_db()
    }
}

fn iface(index: u32, name: &str) -> NetworkInterface {
    NetworkInterface {
        index,
        name: name.into(),
    }
}

#[test]
fn interface_matches_by_index_name_or_both() {
    let lxc = on_interface(7, "lxc1234");
    let cases: &[(&[NetworkInterface], bool)] = &[
        (&[iface(0, "lxc1234")], true),
        (&[iface(0, "eth0")], false),
        (&[iface(7, "")], true),
        (&[iface(8, "")], false),
        (&[iface(7, "lxc1234")], true),
        (&[iface(7, "eth0")], false),
        (&[iface(8, "lxc1234")], false),
        // OR within the field.
        (&[iface(0, "eth0"), iface(7, "")], true),
        // Neither set: any flow seen on an interface.
        (&[iface(0, "")], true),
    ];
    for (want, matches) in cases {
        let f = one(FlowFilter {
            interface: want.to_vec(),
            ..Default::default()
        });
        assert_eq!(f.matches(&lxc), *matches, "{want:?}");
    }
    // A flow without an interface matches no interface filter, as in Hubble.
    let f = one(FlowFilter {
        interface: vec![iface(0, "")],
        ..Default::default()
    });
    assert!(!f.matches(&web_to_db()));
    // AND with the other fields.
    let f = one(FlowFilter {
        interface: vec![iface(0, "lxc1234")],
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    });
    assert!(!f.matches(&lxc));
    // Under --not: everything but the flows on that interface.
    let f = FlowFilters::compile(
        &[],
        &[FlowFilter {
            interface: vec![iface(0, "eth0")],
            ..Default::default()
        }],
    )
    .expect("compiles");
    assert!(f.matches(&lxc) && !f.matches(&on_interface(2, "eth0")));
}

#[test]
fn encrypted_false_matches_every_flow_and_true_none() {
    let no_ip = Flow {
        ip: None,
        ..world_to_dns()
    };
    let flows = [web_to_db(), world_to_dns(), no_ip];
    let unencrypted = one(FlowFilter {
        encrypted: vec![false],
        ..Default::default()
    });
    let encrypted = one(FlowFilter {
        encrypted: vec![true],
        ..Default::default()
    });
    let either = one(FlowFilter {
        encrypted: vec![true, false],
        ..Default::default()
    });
    for flow in &flows {
        assert!(unencrypted.matches(flow) && either.matches(flow));
        assert!(!encrypted.matches(flow));
    }
    // A flow marked encrypted (none is today) is matched on the field itself.
    let marked = Flow {
        ip: Some(Ip {
            encrypted: true,
            ..web_to_db().ip.unwrap_or_default()
        }),
        ..web_to_db()
    };
    assert!(encrypted.matches(&marked) && !unencrypted.matches(&marked));
}

#[test]
fn unsupported_fields_are_rejected_naming_the_field() {
    let cases: Vec<(FlowFilter, &str)> = vec![
        (
            FlowFilter {
                http_url: strs(&["/api/.*"]),
                ..Default::default()
            },
            "http_url",
        ),
        (
            FlowFilter {
                http_header: vec![HttpHeader {
                    key: "x-request-id".into(),
                    value: String::new(),
                }],
                ..Default::default()
            },
            "http_header",
        ),
        (
            FlowFilter {
                source_ip_xlated: strs(&["10.0.0.1"]),
                ..Default::default()
            },
            "source_ip_xlated",
        ),
        (
            FlowFilter {
                node_labels: strs(&["topology.kubernetes.io/zone=a"]),
                ..Default::default()
            },
            "node_labels",
        ),
        (
            FlowFilter {
                source_cluster_name: strs(&["east"]),
                ..Default::default()
            },
            "source_cluster_name",
        ),
        (
            FlowFilter {
                destination_cluster_name: strs(&["west"]),
                ..Default::default()
            },
            "destination_cluster_name",
        ),
        (
            FlowFilter {
                ip_trace_id: vec![42],
                ..Default::default()
            },
            "ip_trace_id",
        ),
        (
            FlowFilter {
                experimental: Some(Experimental {
                    cel_expression: strs(&["_flow.verdict == Verdict.DROPPED"]),
                }),
                ..Default::default()
            },
            "experimental.cel_expression",
        ),
    ];
    for (filter, field) in cases {
        for (wl, bl) in [
            (vec![filter.clone()], vec![]),
            (vec![], vec![filter.clone()]),
        ] {
            let err = FlowFilters::compile(&wl, &bl).expect_err(field);
            assert!(
                matches!(err, FilterError::Unsupported { field: f, .. } if f == field),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!(
                    "FlowFilter field {field} is not supported by Lumen: "
                )),
                "{msg}"
            );
        }
    }
}

#[test]
fn http_url_and_header_rejections_say_lumen_parses_no_l7() {
    for filter in [
        FlowFilter {
            http_url: strs(&["/"]),
            ..Default::default()
        },
        FlowFilter {
            http_header: vec![HttpHeader::default()],
            ..Default::default()
        },
    ] {
        let msg = FlowFilters::compile(&[filter], &[])
            .expect_err("rejected")
            .to_string();
        assert!(msg.contains("does not parse L7 (HTTP) traffic"), "{msg}");
    }
}

#[test]
fn empty_experimental_is_no_filter() {
    // A client may send `experimental {}` with no CEL: nothing to reject.
    let f = one(FlowFilter {
        experimental: Some(Experimental::default()),
        ..Default::default()
    });
    assert!(f.matches(&web_to_db()) && f.matches(&world_to_dns()));
}

/// `--type policy-verdict` selects the records that carry a connection's policy decision
/// (its first packet's record, or a policy drop), whatever their own monitor type.
#[test]
fn policy_verdict_type_selects_records_that_carry_a_policy_decision() {
    use crate::flow::{LumenEventKind, Policy};
    let pv = one(FlowFilter {
        event_type: vec![EventTypeFilter {
            r#type: crate::event_type::POLICY_VERDICT,
            match_sub_type: false,
            sub_type: 0,
        }],
        ..Default::default()
    });
    let rule = || {
        vec![Policy {
            name: "allow-api".into(),
            namespace: "prod".into(),
            ..Default::default()
        }]
    };
    let with = |kind: LumenEventKind, verdict: Verdict, reason: DropReason, allowed: bool| {
        let mut f = web_to_db();
        f.lumen_event_kind = kind as i32;
        f.verdict = verdict as i32;
        f.drop_reason_desc = reason as i32;
        f.event_type = Some(CiliumEventType {
            r#type: if verdict == Verdict::Dropped { 1 } else { 4 },
            sub_type: 5,
        });
        if allowed {
            f.egress_allowed_by = rule();
        }
        f
    };
    use DropReason::{PolicyDenied, PolicyDeny, Unknown};
    use LumenEventKind::{FlowDrop, FlowNew, FlowTcpFlags, FlowUpdate};
    for (f, want, what) in [
        (
            with(FlowNew, Verdict::Forwarded, Unknown, true),
            true,
            "allowed by a rule",
        ),
        (
            with(FlowNew, Verdict::Audit, PolicyDenied, false),
            true,
            "audited",
        ),
        (
            with(FlowNew, Verdict::Dropped, PolicyDenied, false),
            true,
            "default deny",
        ),
        (
            with(FlowDrop, Verdict::Dropped, PolicyDeny, false),
            true,
            "a later policy drop",
        ),
        (
            with(FlowNew, Verdict::Forwarded, Unknown, false),
            false,
            "no policy selects it",
        ),
        (
            with(FlowTcpFlags, Verdict::Forwarded, Unknown, true),
            false,
            "not the first packet",
        ),
        (
            with(FlowUpdate, Verdict::Audit, PolicyDenied, false),
            false,
            "an update",
        ),
        (
            with(FlowDrop, Verdict::Dropped, Unknown, false),
            false,
            "a drop that is no policy's",
        ),
    ] {
        assert_eq!(pv.matches(&f), want, "{what}");
        assert_eq!(is_policy_verdict(&f), want, "{what}");
    }
    // The record's own type still matches as before.
    let trace = one(FlowFilter {
        event_type: vec![EventTypeFilter {
            r#type: 4,
            match_sub_type: false,
            sub_type: 0,
        }],
        ..Default::default()
    });
    assert!(trace.matches(&with(FlowNew, Verdict::Forwarded, Unknown, true)));
}
