//! JSON, field-mask, format and wire-decoding tests over the generated types.

use crate::field_mask::FlowFieldMask;
use crate::flow::*;
use crate::format::{self, FormatOptions, OutputFormat, Printer};
use crate::json::{self, JsonNames};
use crate::observer::{get_flows_response::ResponseTypes, GetFlowsResponse};

/// 2024-05-01T12:34:56.789012345Z
fn ts() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: 1_714_566_896,
        nanos: 789_012_345,
    }
}

fn close_flow() -> Flow {
    Flow {
        time: Some(ts()),
        uuid: "f-1".into(),
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
                    fin: true,
                    ack: true,
                    ..Default::default()
                }),
            })),
        }),
        source: Some(Endpoint {
            id: 12,
            identity: 1234,
            namespace: "prod".into(),
            labels: vec!["k8s:app=web".into()],
            pod_name: "web-1".into(),
            workloads: vec![],
        }),
        destination: Some(Endpoint {
            identity: 5678,
            namespace: "prod".into(),
            pod_name: "db-0".into(),
            ..Default::default()
        }),
        r#type: FlowType::L3L4 as i32,
        node_name: "node-1".into(),
        event_type: Some(CiliumEventType {
            r#type: 4,
            sub_type: 0,
        }),
        traffic_direction: TrafficDirection::Egress as i32,
        trace_observation_point: TraceObservationPoint::ToEndpoint as i32,
        is_reply: Some(false),
        socket_cookie: 1 << 40,
        egress_allowed_by: vec![Policy {
            name: "allow-db".into(),
            namespace: "prod".into(),
            ..Default::default()
        }],
        lumen_event_kind: LumenEventKind::FlowClose as i32,
        counters: Some(FlowCounters {
            orig_packets: 10,
            orig_bytes: 1200,
            reply_packets: 8,
            reply_bytes: 4096,
        }),
        handshake_rtt: Some(prost_types::Duration {
            seconds: 0,
            nanos: 1_500_000,
        }),
        flow_duration: Some(prost_types::Duration {
            seconds: 3,
            nanos: 400_000_000,
        }),
        flow_id: 77,
        first_seen: Some(prost_types::Timestamp {
            seconds: 1_714_566_893,
            nanos: 0,
        }),
        tcp_flags_seen: Some(TcpFlags {
            syn: true,
            ack: true,
            fin: true,
            ..Default::default()
        }),
        packet_length: 66,
        ..Default::default()
    }
}

fn response(flow: Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: flow.node_name.clone(),
        time: flow.time,
        response_types: Some(ResponseTypes::Flow(flow)),
    }
}

#[test]
fn json_uses_hubble_field_names_and_proto3_mapping() {
    let v = json::to_value(&response(close_flow()), JsonNames::Proto).expect("encodes");
    let f = &v["flow"];
    assert_eq!(v["node_name"], "node-1");
    assert_eq!(v["time"], "2024-05-01T12:34:56.789012345Z");
    assert_eq!(f["time"], "2024-05-01T12:34:56.789012345Z");
    assert_eq!(f["verdict"], "FORWARDED");
    assert_eq!(f["Type"], "L3_L4");
    assert_eq!(f["IP"]["ipVersion"], "IPv4");
    assert_eq!(f["IP"]["source"], "10.0.1.5");
    assert_eq!(f["l4"]["TCP"]["destination_port"], 5432);
    assert_eq!(f["l4"]["TCP"]["flags"]["FIN"], true);
    assert_eq!(f["source"]["pod_name"], "web-1");
    assert_eq!(f["source"]["ID"], 12);
    assert_eq!(f["event_type"]["type"], 4);
    assert_eq!(f["traffic_direction"], "EGRESS");
    assert_eq!(f["trace_observation_point"], "TO_ENDPOINT");
    assert_eq!(f["is_reply"], false);
    // 64-bit integers are strings in proto3 JSON.
    assert_eq!(f["socket_cookie"], "1099511627776");
    assert_eq!(f["egress_allowed_by"][0]["name"], "allow-db");
    assert_eq!(f["lumen_event_kind"], "FLOW_CLOSE");
    assert_eq!(f["counters"]["orig_packets"], "10");
    assert_eq!(f["handshake_rtt"], "0.001500s");
    assert_eq!(f["flow_duration"], "3.400s");
    assert_eq!(f["first_seen"], "2024-05-01T12:34:53Z");
    assert_eq!(f["flow_id"], "77");
    // Default values are omitted.
    assert!(f.get("drop_reason_desc").is_none());
    assert!(f.get("destination").and_then(|d| d.get("ID")).is_none());
}

#[test]
fn json_lower_camel_names() {
    let v = json::to_value(&close_flow(), JsonNames::LowerCamel).expect("encodes");
    assert_eq!(v["l4"]["TCP"]["destinationPort"], 5432);
    assert_eq!(v["source"]["podName"], "web-1");
    assert_eq!(v["nodeName"], "node-1");
    assert_eq!(v["lumenEventKind"], "FLOW_CLOSE");
}

#[test]
fn json_round_trips_in_both_styles() {
    let resp = response(close_flow());
    for names in [JsonNames::Proto, JsonNames::LowerCamel] {
        let s = json::to_string(&resp, names).expect("encodes");
        assert!(!s.contains('\n'));
        let back: GetFlowsResponse = json::from_str(&s).expect("decodes");
        assert_eq!(back, resp);
    }
    let lost = GetFlowsResponse {
        response_types: Some(ResponseTypes::LostEvents(LostEvent {
            source: LostEventSource::PerfEventRingBuffer as i32,
            num_events_lost: 5,
            cpu: Some(1),
        })),
        ..Default::default()
    };
    let s = json::to_string(&lost, JsonNames::Proto).expect("encodes");
    assert_eq!(
        s,
        r#"{"lost_events":{"source":"PERF_EVENT_RING_BUFFER","num_events_lost":"5","cpu":1}}"#
    );
    assert!(json::from_str::<Flow>("{\"verdict\": 12.5}").is_err());
}

#[test]
fn field_mask_keeps_only_listed_paths() {
    let mask = FlowFieldMask::compile(&[
        "time",
        "verdict",
        "source.pod_name",
        "l4.TCP.destination_port",
    ])
    .expect("valid")
    .expect("non-empty");
    let f = mask.apply(&close_flow());
    assert_eq!(f.time, Some(ts()));
    assert_eq!(f.verdict, Verdict::Forwarded as i32);
    let src = f.source.expect("source kept");
    assert_eq!(src.pod_name, "web-1");
    assert_eq!(src.namespace, "");
    assert!(f.destination.is_none() && f.ip.is_none() && f.counters.is_none());
    match f.l4.and_then(|l| l.protocol) {
        Some(layer4::Protocol::Tcp(t)) => {
            assert_eq!(t.destination_port, 5432);
            assert_eq!(t.source_port, 0);
            assert!(t.flags.is_none());
        }
        other => panic!("expected TCP, got {other:?}"),
    }
    assert!(FlowFieldMask::compile::<&str>(&[])
        .expect("valid")
        .is_none());
}

#[test]
fn field_mask_rejects_unknown_paths() {
    for bad in ["nope", "source.nope", "verdict.x", "source.labels.x", ""] {
        let err = FlowFieldMask::compile(&[bad]).expect_err(bad);
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn compact_line() {
    let line = format::compact(&close_flow(), &FormatOptions::default());
    assert_eq!(
        line,
        "May  1 12:34:56.789: prod/web-1:43210 (ID:1234) -> prod/db-0:5432 (ID:5678) to-endpoint FORWARDED \
         (TCP Flags: FIN, ACK) lumen:close rtt=1.5ms dur=3.40s pkts=10/8 bytes=1.2KiB/4.0KiB \
         egress-allowed-by:prod/allow-db"
    );
    let with_node = format::compact(
        &close_flow(),
        &FormatOptions {
            node_name: true,
            ..Default::default()
        },
    );
    assert!(
        with_node.starts_with("May  1 12:34:56.789 [node-1]: prod/web-1:43210"),
        "{with_node}"
    );
}

#[test]
fn compact_drop_reply_and_world() {
    let drop = Flow {
        time: Some(ts()),
        verdict: Verdict::Dropped as i32,
        drop_reason_desc: DropReason::PolicyDenied as i32,
        event_type: Some(CiliumEventType {
            r#type: crate::event_type::DROP,
            sub_type: 133,
        }),
        ip: Some(Ip {
            source: "2001:db8::1".into(),
            destination: "10.0.2.7".into(),
            ..Default::default()
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Udp(Udp {
                source_port: 5353,
                destination_port: 53,
            })),
        }),
        source: Some(Endpoint {
            identity: 2,
            ..Default::default()
        }),
        ingress_denied_by: vec![Policy {
            name: "deny-world".into(),
            namespace: "prod".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        format::compact(&drop, &FormatOptions::default()),
        "May  1 12:34:56.789: [2001:db8::1]:5353 (world) <> 10.0.2.7:53 Policy denied DROPPED (UDP) \
         ingress-denied-by:prod/deny-world"
    );
    let mut reply = close_flow();
    reply.is_reply = Some(true);
    reply.lumen_event_kind = 0;
    reply.egress_allowed_by.clear();
    reply.handshake_rtt = None;
    let line = format::compact(&reply, &FormatOptions::default());
    assert!(
        line.contains(": prod/db-0:5432 (ID:5678) <- prod/web-1:43210 (ID:1234) "),
        "{line}"
    );
}

#[test]
fn every_format_prints_lost_events_and_node_status() {
    let lost = GetFlowsResponse {
        node_name: "node-1".into(),
        time: Some(ts()),
        response_types: Some(ResponseTypes::LostEvents(LostEvent {
            source: LostEventSource::HubbleRingBuffer as i32,
            num_events_lost: 42,
            cpu: None,
        })),
    };
    let status = GetFlowsResponse {
        time: Some(ts()),
        response_types: Some(ResponseTypes::NodeStatus(crate::relay::NodeStatusEvent {
            state_change: crate::relay::NodeState::NodeUnavailable as i32,
            node_names: vec!["node-2".into()],
            message: "connection refused".into(),
        })),
        ..Default::default()
    };
    for fmt in [
        OutputFormat::Compact,
        OutputFormat::Table,
        OutputFormat::Dict,
        OutputFormat::Json,
    ] {
        let mut p = Printer::new(Vec::new(), fmt, FormatOptions::default());
        p.write_response(&response(close_flow())).expect("writes");
        p.write_response(&lost).expect("writes");
        p.write_response(&status).expect("writes");
        let out = String::from_utf8(p.into_inner()).expect("utf-8");
        assert!(
            out.contains("HUBBLE_RING_BUFFER") && out.contains("42"),
            "{fmt:?}: {out}"
        );
        assert!(
            out.contains("NODE_UNAVAILABLE") && out.contains("node-2"),
            "{fmt:?}: {out}"
        );
        assert!(
            out.contains("prod/web-1") || fmt == OutputFormat::Json,
            "{fmt:?}: {out}"
        );
        if fmt == OutputFormat::Json {
            assert_eq!(out.lines().count(), 3);
            for line in out.lines() {
                serde_json::from_str::<serde_json::Value>(line).expect("each line is JSON");
            }
        }
        if fmt == OutputFormat::Table {
            assert!(out.starts_with("TIMESTAMP"), "{out}");
        }
        if fmt == OutputFormat::Dict {
            assert!(out.contains("  TIMESTAMP: May  1 12:34:56.789"), "{out}");
            assert!(out.contains("------------"), "{out}");
            assert!(out.contains("HANDSHAKE RTT: 1.5ms"), "{out}");
        }
    }
}

/// A FlowFilter with every field Hubble added after 30, as a stock Go client
/// encodes it (proto3 packs repeated scalars). Written by hand from Hubble's
/// numbering, tag = field << 3 | wire type as a varint; cross-checked against
/// Google's protobuf runtime encoding a descriptor built from Hubble's
/// flow.proto. A field prost did not know would decode as nothing.
const HUBBLE_FILTER_31_TO_999: &[u8] = &[
    0xfa, 0x01, 0x04, b'/', b'a', b'p', b'i', // 31 http_url "/api"
    0x82, 0x02, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b', // 32 http_header {a: b}
    0x8a, 0x02, 0x04, 0x85, 0x01, 0xb5, 0x01, // 33 drop_reason_desc [133, 181]
    0x92, 0x02, 0x08, b'1', b'0', b'.', b'0', b'.', b'0', b'.', b'1', // 34 source_ip_xlated
    0x9a, 0x02, 0x08, 0x08, 0x07, 0x12, 0x04, b'e', b't', b'h',
    b'0', // 35 interface {7, eth0}
    0xa2, 0x02, 0x0a, b'k', b'8', b's', b':', b'z', b'o', b'n', b'e', b'=',
    b'a', // 36 node_labels
    0xaa, 0x02, 0x02, b'c', b'1', // 37 source_cluster_name
    0xb2, 0x02, 0x02, b'c', b'2', // 38 destination_cluster_name
    0xba, 0x02, 0x02, 0xac, 0x02, // 39 ip_trace_id [300]
    0xc2, 0x02, 0x02, 0x01, 0x00, // 40 encrypted [true, false]
    0xba, 0x3e, 0x06, 0x0a, 0x04, b't', b'r', b'u', b'e', // 999 experimental {cel_expression}
];

#[test]
fn flow_filter_fields_31_to_999_decode_from_hubble_wire_bytes() {
    use prost::Message;
    let f = FlowFilter::decode(HUBBLE_FILTER_31_TO_999).expect("decodes");
    assert_eq!(f.http_url, ["/api"]);
    assert_eq!(
        f.http_header,
        [HttpHeader {
            key: "a".into(),
            value: "b".into()
        }]
    );
    assert_eq!(
        f.drop_reason_desc,
        [
            DropReason::PolicyDenied as i32,
            DropReason::PolicyDeny as i32
        ]
    );
    assert_eq!(f.source_ip_xlated, ["10.0.0.1"]);
    assert_eq!(
        f.interface,
        [NetworkInterface {
            index: 7,
            name: "eth0".into()
        }]
    );
    assert_eq!(f.node_labels, ["k8s:zone=a"]);
    assert_eq!(f.source_cluster_name, ["c1"]);
    assert_eq!(f.destination_cluster_name, ["c2"]);
    assert_eq!(f.ip_trace_id, [300]);
    assert_eq!(f.encrypted, [true, false]);
    assert_eq!(
        f.experimental.map(|e| e.cel_expression),
        Some(vec!["true".to_owned()])
    );
    // Nothing else was set: the bytes landed on these fields and no others.
    let only_new = FlowFilter {
        http_url: vec![],
        http_header: vec![],
        drop_reason_desc: vec![],
        source_ip_xlated: vec![],
        interface: vec![],
        node_labels: vec![],
        source_cluster_name: vec![],
        destination_cluster_name: vec![],
        ip_trace_id: vec![],
        encrypted: vec![],
        experimental: None,
        ..FlowFilter::decode(HUBBLE_FILTER_31_TO_999).expect("decodes")
    };
    assert_eq!(only_new, FlowFilter::default());
}

#[test]
fn unpacked_repeated_scalars_decode_too() {
    use prost::Message;
    // Older encoders may send one tag per value: 33 as varint (wire type 0).
    let f = FlowFilter::decode(&[0x88, 0x02, 0x85, 0x01, 0xc0, 0x02, 0x00][..]).expect("decodes");
    assert_eq!(f.drop_reason_desc, [DropReason::PolicyDenied as i32]);
    assert_eq!(f.encrypted, [false]);
}

/// `hubble observe --interface eth0` (whitelist = 6) and the same with `--not`
/// (blacklist = 5): one FlowFilter { interface: [{name: "eth0"}] }.
const OBSERVE_INTERFACE_ETH0: &[u8] = &[
    0x32, 0x09, 0x9a, 0x02, 0x06, 0x12, 0x04, b'e', b't', b'h', b'0',
];
const OBSERVE_NOT_INTERFACE_ETH0: &[u8] = &[
    0x2a, 0x09, 0x9a, 0x02, 0x06, 0x12, 0x04, b'e', b't', b'h', b'0',
];

#[test]
fn stock_interface_filter_selects_flows_on_that_interface() {
    use crate::filter::FlowFilters;
    use crate::observer::GetFlowsRequest;
    use prost::Message;
    let on = |index: u32, name: &str| Flow {
        interface: Some(NetworkInterface {
            index,
            name: name.into(),
        }),
        ..close_flow()
    };
    let (eth0, lxc) = (on(2, "eth0"), on(9, "lxc1234"));

    let req = GetFlowsRequest::decode(OBSERVE_INTERFACE_ETH0).expect("decodes");
    let f = FlowFilters::from_request(&req).expect("compiles");
    assert!(f.matches(&eth0));
    assert!(
        !f.matches(&lxc),
        "an unknown field would have matched every flow"
    );

    let req = GetFlowsRequest::decode(OBSERVE_NOT_INTERFACE_ETH0).expect("decodes");
    let f = FlowFilters::from_request(&req).expect("compiles");
    assert!(!f.matches(&eth0));
    assert!(
        f.matches(&lxc),
        "an unknown field would have matched no flow"
    );
}

#[test]
fn stock_unsupported_filter_bytes_are_rejected() {
    use crate::filter::{FilterError, FlowFilters};
    use crate::observer::GetFlowsRequest;
    use prost::Message;
    // whitelist { node_labels: ["k8s:zone=a"] }
    let bytes = [
        0x32, 0x0d, 0xa2, 0x02, 0x0a, b'k', b'8', b's', b':', b'z', b'o', b'n', b'e', b'=', b'a',
    ];
    let req = GetFlowsRequest::decode(&bytes[..]).expect("decodes");
    let err = FlowFilters::from_request(&req).expect_err("rejected");
    assert_eq!(
        err,
        FilterError::Unsupported {
            field: "node_labels",
            reason: "flows carry no node labels",
        }
    );
}

fn icmp_summary(protocol: layer4::Protocol) -> String {
    format::summary(&Flow {
        l4: Some(Layer4 {
            protocol: Some(protocol),
        }),
        ..Default::default()
    })
}

#[test]
fn icmp_summaries_are_hubbles() {
    // Hubble's summary is "ICMPv6 " + gopacket's ICMPv6TypeCode.String() (layers/icmp6.go).
    let v6 = |t, code| icmp_summary(layer4::Protocol::IcmPv6(IcmPv6 { r#type: t, code }));
    assert_eq!(v6(133, 0), "ICMPv6 RouterSolicitation");
    assert_eq!(v6(134, 0), "ICMPv6 RouterAdvertisement");
    assert_eq!(v6(135, 0), "ICMPv6 NeighborSolicitation");
    assert_eq!(v6(136, 0), "ICMPv6 NeighborAdvertisement");
    assert_eq!(v6(137, 0), "ICMPv6 Redirect");
    assert_eq!(v6(2, 0), "ICMPv6 PacketTooBig");
    assert_eq!(v6(128, 0), "ICMPv6 EchoRequest");
    assert_eq!(v6(1, 4), "ICMPv6 DestinationUnreachable(PortUnreachable)");
    assert_eq!(v6(1, 9), "ICMPv6 DestinationUnreachable(Code: 9)");
    assert_eq!(v6(129, 1), "ICMPv6 EchoReply(Code: 1)");
    // gopacket names no MLD message: MLDv2 reports (143) print as type(code).
    assert_eq!(v6(143, 0), "ICMPv6 143(0)");
    let v4 = |t, code| icmp_summary(layer4::Protocol::IcmPv4(IcmPv4 { r#type: t, code }));
    assert_eq!(v4(8, 0), "ICMPv4 EchoRequest");
    assert_eq!(v4(0, 0), "ICMPv4 EchoReply");
    assert_eq!(v4(3, 3), "ICMPv4 DestinationUnreachable(Port)");
    assert_eq!(v4(11, 0), "ICMPv4 TimeExceeded(TTLExceeded)");
    assert_eq!(v4(42, 7), "ICMPv4 42(7)");
}

#[test]
fn percent_has_two_decimals_like_hubble() {
    assert_eq!(format::percent(3, 400).as_deref(), Some("0.75%"));
    assert_eq!(format::percent(4, 4095).as_deref(), Some("0.10%"));
    assert_eq!(format::percent(4095, 4095).as_deref(), Some("100.00%"));
    assert_eq!(format::percent(1, 0), None);
}
