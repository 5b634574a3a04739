//! Proto3 JSON for Lumen messages, through reflection over the embedded
//! descriptors, so well-known types (Timestamp, Duration, wrappers, FieldMask)
//! follow the proto3 JSON mapping exactly.
//!
//! [`JsonNames::Proto`] (the default) prints what `hubble observe -o json`
//! prints: the proto field names (`source_port`, `pod_name`, `IP`,
//! `ipVersion`), enums as names, 64-bit integers as strings, timestamps as
//! RFC 3339. [`JsonNames::LowerCamel`] prints the canonical proto3 JSON names
//! (`sourcePort`, `podName`). Parsing accepts both.

use prost::{Message, Name};
use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions};

use crate::descriptor;

/// Which field names to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JsonNames {
    /// The names in the .proto files, as Hubble prints them.
    #[default]
    Proto,
    /// The proto3 JSON `json_name`s (lowerCamelCase).
    LowerCamel,
}

/// Proto3 JSON encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("message type {name} is not in Lumen's descriptor set")]
    UnknownMessage { name: String },
    #[error("cannot convert {name} to or from its reflected form: {source}")]
    Reflect {
        name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("invalid JSON for {name}: {source}")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

fn to_dynamic<M: Message + Name>(msg: &M) -> Result<DynamicMessage, JsonError> {
    let name = M::full_name();
    let desc = descriptor::message(&name)
        .ok_or_else(|| JsonError::UnknownMessage { name: name.clone() })?;
    DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|source| JsonError::Reflect { name, source })
}

fn options(names: JsonNames) -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(names == JsonNames::Proto)
        .skip_default_fields(true)
        .stringify_64_bit_integers(true)
}

/// Encodes `msg` as a `serde_json::Value`.
pub fn to_value<M: Message + Name>(
    msg: &M,
    names: JsonNames,
) -> Result<serde_json::Value, JsonError> {
    let dynamic = to_dynamic(msg)?;
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options(names))
        .map_err(|source| JsonError::Json {
            name: M::full_name(),
            source,
        })
}

/// Encodes `msg` as one line of JSON (no trailing newline).
pub fn to_string<M: Message + Name>(msg: &M, names: JsonNames) -> Result<String, JsonError> {
    let dynamic = to_dynamic(msg)?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &options(names))
        .map_err(|source| JsonError::Json {
            name: M::full_name(),
            source,
        })?;
    // serde_json only writes valid UTF-8.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Decodes a message from proto3 JSON (either field-name style).
pub fn from_str<M: Message + Name + Default>(json: &str) -> Result<M, JsonError> {
    let name = M::full_name();
    let desc = descriptor::message(&name)
        .ok_or_else(|| JsonError::UnknownMessage { name: name.clone() })?;
    let mut de = serde_json::Deserializer::from_str(json);
    let dynamic =
        DynamicMessage::deserialize_with_options(desc, &mut de, &DeserializeOptions::new())
            .and_then(|m| de.end().map(|()| m))
            .map_err(|source| JsonError::Json {
                name: name.clone(),
                source,
            })?;
    dynamic
        .transcode_to::<M>()
        .map_err(|source| JsonError::Reflect { name, source })
}
