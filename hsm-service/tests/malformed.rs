//! Malformed and oversized values at every RPC of every service, through the real client
//! channel over mTLS: each answer must be a clear status (a response, or any code but
//! `INTERNAL`, `UNKNOWN`, `UNAVAILABLE` and `DATA_LOSS`), a caller of a role the method
//! does not allow must get `PERMISSION_DENIED`, and the service must be healthy and
//! working afterwards.
//!
//! The RPCs and their request messages come from the proto files' descriptors
//! (`hsm_proto::FILE_DESCRIPTOR_SET`), and the bad values from each field's type in
//! them, so a new RPC or field is covered without touching this file. The messages are
//! encoded by hand (a raw codec), which is how a string field gets invalid UTF-8.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::{Buf, BufMut};
use hsm_client::HsmClient;
use hsm_service::auth::gate::METHOD_ROLES;
use hsm_service::auth::Role;
use hsm_service::testing::DevEnv;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// Bytes in, bytes out: requests are encoded by hand.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// One RPC of the wire contract.
struct Rpc {
    /// `package.Service/Method`.
    name: String,
    input: DescriptorProto,
    client_streaming: bool,
}

fn descriptors() -> FileDescriptorSet {
    FileDescriptorSet::decode(hsm_proto::FILE_DESCRIPTOR_SET).expect("descriptor set")
}

/// Every RPC of every service in the proto files.
fn rpcs() -> Vec<Rpc> {
    let set = descriptors();
    let message = |full: &str| -> DescriptorProto {
        for file in &set.file {
            let package = file.package();
            for m in &file.message_type {
                if full == format!(".{package}.{}", m.name()) {
                    return m.clone();
                }
            }
        }
        panic!("message {full} is not in the descriptors")
    };
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                out.push(Rpc {
                    name: format!("{}.{}/{}", file.package(), service.name(), method.name()),
                    input: message(method.input_type()),
                    client_streaming: method.client_streaming(),
                });
            }
        }
    }
    out
}

// --- protobuf wire format, by hand ---------------------------------------------------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: i32, wire_type: u8) {
    varint(out, (u64::from(field as u32) << 3) | u64::from(wire_type));
}

fn len_field(out: &mut Vec<u8>, field: i32, bytes: &[u8]) {
    tag(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_field(out: &mut Vec<u8>, field: i32, v: u64) {
    tag(out, field, 0);
    varint(out, v);
}

/// A request with one bad value, and what it is (for failure messages).
struct Case {
    what: String,
    body: Vec<u8>,
}

const LONG: usize = 64 * 1024;
/// Below the service's smallest decoding limit (64 KiB for most services would refuse
/// it at the codec; the signing and ceremony services take more).
const HUGE: usize = 3 * 1024 * 1024;
const REPEATS: usize = 100_000;

fn is_varint_type(t: Type) -> bool {
    matches!(
        t,
        Type::Int32
            | Type::Int64
            | Type::Uint32
            | Type::Uint64
            | Type::Sint32
            | Type::Sint64
            | Type::Bool
            | Type::Enum
    )
}

/// The bad values of one field.
fn field_cases(f: &FieldDescriptorProto) -> Vec<Case> {
    let n = f.number();
    let name = f.name();
    let mut cases = Vec::new();
    let mut one = |what: &str, body: Vec<u8>| {
        cases.push(Case {
            what: format!("{name}: {what}"),
            body,
        })
    };
    let t = f.r#type();
    match t {
        Type::String => {
            let mut b = Vec::new();
            len_field(&mut b, n, b"nul\0inside");
            one("a NUL inside", b);
            let mut b = Vec::new();
            len_field(&mut b, n, &[b'a', 0xff, 0xfe, 0xc3, 0x28]);
            one("invalid UTF-8", b);
            let mut b = Vec::new();
            len_field(&mut b, n, "é".repeat(LONG / 2).as_bytes());
            one("64 KiB", b);
            let mut b = Vec::new();
            len_field(&mut b, n, &vec![b'x'; HUGE]);
            one("3 MiB", b);
            let mut b = Vec::new();
            len_field(&mut b, n, b" \t\n");
            one("white space only", b);
        }
        Type::Bytes => {
            let mut b = Vec::new();
            len_field(&mut b, n, &vec![0xa5; LONG]);
            one("64 KiB", b);
            let mut b = Vec::new();
            len_field(&mut b, n, &vec![0; HUGE]);
            one("3 MiB of zeros", b);
            let mut b = Vec::new();
            len_field(&mut b, n, &[0xff]);
            one("one byte", b);
        }
        Type::Enum => {
            let mut b = Vec::new();
            varint_field(&mut b, n, 9999);
            one("out-of-range enum 9999", b);
            let mut b = Vec::new();
            varint_field(&mut b, n, u64::MAX);
            one("enum -1", b);
        }
        Type::Message => {
            let mut b = Vec::new();
            len_field(&mut b, n, &[0xff, 0xff, 0xff]);
            one("a nested message that does not decode", b);
            let mut b = Vec::new();
            len_field(&mut b, n, &[]);
            one("an empty nested message", b);
        }
        t if is_varint_type(t) => {
            let mut b = Vec::new();
            varint_field(&mut b, n, u64::MAX);
            one("all ones (max / -1)", b);
            let mut b = Vec::new();
            varint_field(&mut b, n, u64::from(u32::MAX));
            one("u32::MAX", b);
        }
        Type::Fixed32 | Type::Sfixed32 | Type::Float => {
            let mut b = Vec::new();
            tag(&mut b, n, 5);
            b.extend_from_slice(&[0xff; 4]);
            one("all ones", b);
        }
        Type::Fixed64 | Type::Sfixed64 | Type::Double => {
            let mut b = Vec::new();
            tag(&mut b, n, 1);
            b.extend_from_slice(&[0xff; 8]);
            one("all ones", b);
        }
        other => panic!("field {name}: type {other:?} has no bad values here"),
    }
    // The wrong wire type: a fixed32 where the field is length-delimited or varint.
    let mut b = Vec::new();
    tag(&mut b, n, 5);
    b.extend_from_slice(&[1, 2, 3, 4]);
    one("the wrong wire type", b);
    if f.label() == Label::Repeated {
        let mut b = Vec::new();
        for _ in 0..REPEATS {
            match t {
                Type::String | Type::Bytes => len_field(&mut b, n, b"x"),
                Type::Message => len_field(&mut b, n, &[]),
                t if is_varint_type(t) => varint_field(&mut b, n, 1),
                _ => {
                    tag(&mut b, n, 5);
                    b.extend_from_slice(&[0; 4]);
                }
            }
        }
        one(&format!("{REPEATS} repeated entries"), b);
    }
    cases
}

/// The bad requests of one RPC: each field's bad values, then whole-message ones.
fn cases(rpc: &Rpc) -> Vec<Case> {
    let mut all: Vec<Case> = rpc.input.field.iter().flat_map(field_cases).collect();
    let whole = |what: &str, body: Vec<u8>| Case {
        what: what.to_owned(),
        body,
    };
    all.push(whole("the empty message", Vec::new()));
    all.push(whole("a truncated varint", vec![0x08, 0xff]));
    all.push(whole("a length past the end", vec![0x0a, 0x7f, b'a']));
    all.push(whole("field number 0", vec![0x00, 0x01]));
    all.push(whole("an unknown field 999", {
        let mut b = Vec::new();
        len_field(&mut b, 999, b"unknown");
        b
    }));
    all.push(whole("8 MiB of unknown field", {
        let mut b = Vec::new();
        len_field(&mut b, 999, &vec![0; 8 * 1024 * 1024]);
        b
    }));
    all
}

/// The dev identity of a role.
fn cn_of(role: Role) -> &'static str {
    match role {
        Role::LoginService => "login-service",
        Role::Officer => "officer-1",
        Role::Auditor => "auditor",
        Role::Notifier => "notifier",
    }
}

const ROLES: [Role; 4] = [
    Role::LoginService,
    Role::Officer,
    Role::Auditor,
    Role::Notifier,
];

/// Codes that are never a clear answer to a malformed request.
fn unclear(code: Code) -> bool {
    matches!(
        code,
        Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss
    )
}

/// Call `method` with `body` (once, or for a client-streaming RPC as three messages) and
/// read at most a few messages of the answer: `Ok` or the status.
async fn call(client: &HsmClient, rpc: &Rpc, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(client.channel());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path: http::uri::PathAndQuery = format!("/{}", rpc.name).parse().expect("path");
    let messages = if rpc.client_streaming {
        vec![body.clone(), body.clone(), body]
    } else {
        vec![body]
    };
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let mut stream = grpc.streaming(request, path, Raw).await?.into_inner();
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
            // A watch follows: no further message within the wait is fine.
            Err(_) | Ok(Ok(None)) => break,
            Ok(Ok(Some(_))) => {}
            Ok(Err(status)) => return Err(status),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_malformed_and_oversized_values_clearly_and_the_service_stays_healthy() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let mut clients = Vec::new();
    for role in ROLES {
        clients.push((
            role,
            common::client(env.dir.path(), cn_of(role), addr).await,
        ));
    }
    let client_of = |role: Role| &clients.iter().find(|(r, _)| *r == role).expect("role").1;

    let rpcs = rpcs();
    let mut called = BTreeSet::new();
    let mut failures = Vec::new();
    let mut calls = 0usize;
    for rpc in &rpcs {
        let allowed: Vec<Role> = METHOD_ROLES
            .iter()
            .find(|(m, _)| *m == rpc.name)
            .map(|(_, roles)| roles.to_vec())
            .unwrap_or_default();
        // A method the gate does not know is refused to everyone: try it as a login
        // service (it must still answer clearly).
        let caller = allowed.first().copied().unwrap_or(Role::LoginService);
        for case in cases(rpc) {
            calls += 1;
            if let Err(status) = call(client_of(caller), rpc, case.body).await {
                if unclear(status.code()) {
                    failures.push(format!(
                        "{} as {}, {}: {:?} {}",
                        rpc.name,
                        caller.as_str(),
                        case.what,
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
        // Every role the method does not allow is refused, whatever the message.
        for role in ROLES.iter().copied().filter(|r| !allowed.contains(r)) {
            calls += 1;
            let answer = call(client_of(role), rpc, Vec::new()).await;
            match answer {
                Err(s) if s.code() == Code::PermissionDenied => {}
                other => failures.push(format!(
                    "{} as {} (not allowed): {:?}",
                    rpc.name,
                    role.as_str(),
                    other.map_err(|s| (s.code(), s.message().to_owned()))
                )),
            }
        }
        called.insert(rpc.name.clone());
    }
    assert!(
        failures.is_empty(),
        "{} of {calls} calls were not answered clearly:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every RPC of the gate's table was among them (the descriptors are the source, the
    // table must not hold a method they lack).
    for (m, _) in METHOD_ROLES {
        assert!(
            called.contains(*m),
            "{m} is served but not in the proto descriptors"
        );
    }
    assert!(
        rpcs.len() >= 29,
        "only {} RPCs in the descriptors",
        rpcs.len()
    );

    // Still healthy, and still working: a credential made and verified, the status read.
    let login = client_of(Role::LoginService);
    assert_eq!(
        login.health().await.expect("health"),
        ServingStatus::Serving
    );
    common::enrol(login, "after-malformed", "citizen-after").await;
    let verdict = common::verify_hotp(login, "after-malformed", 0).await;
    assert_eq!(
        verdict.result,
        hsm_client::proto::VerifyResult::Accepted as i32,
        "a good code after the malformed ones"
    );
    client_of(Role::Officer)
        .admin()
        .get_status(hsm_client::proto::GetStatusRequest {})
        .await
        .expect("status");
    server.shutdown().await.expect("shutdown");
}

/// The generator knows every field type the proto files use, and makes at least one bad
/// value for each field of every request message.
#[test]
fn every_request_field_gets_bad_values() {
    for rpc in rpcs() {
        for f in &rpc.input.field {
            assert!(
                !field_cases(f).is_empty(),
                "{}: field {} has no bad values",
                rpc.name,
                f.name()
            );
        }
    }
}
