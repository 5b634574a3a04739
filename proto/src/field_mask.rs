//! Applies a GetFlowsRequest `field_mask` to flows: only the listed paths
//! (e.g. `"time"`, `"verdict"`, `"source.pod_name"`, `"l4.TCP.destination_port"`)
//! are kept. Paths name proto fields by their .proto names, joined by dots.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};

use crate::{descriptor, flow::Flow};

/// A field-mask path that does not name a field of `flow.Flow`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldMaskError {
    #[error("invalid field_mask path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
}

/// A validated field mask over `flow.Flow`.
#[derive(Debug, Clone)]
pub struct FlowFieldMask {
    desc: MessageDescriptor,
    paths: Vec<Vec<FieldDescriptor>>,
}

impl FlowFieldMask {
    /// Validates `paths`. Returns `Ok(None)` when there are no paths (keep
    /// every field, as Hubble does for an empty mask).
    pub fn compile<S: AsRef<str>>(paths: &[S]) -> Result<Option<Self>, FieldMaskError> {
        if paths.is_empty() {
            return Ok(None);
        }
        let desc = descriptor::message("flow.Flow").ok_or_else(|| FieldMaskError::InvalidPath {
            path: String::new(),
            reason: "flow.Flow is missing from the descriptor set".to_owned(),
        })?;
        let compiled = paths
            .iter()
            .map(|p| resolve(&desc, p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            desc,
            paths: compiled,
        }))
    }

    /// Compiles the mask of a request (`field_mask`, or the deprecated
    /// `experimental.field_mask` when the former is empty).
    pub fn from_request(
        req: &crate::observer::GetFlowsRequest,
    ) -> Result<Option<Self>, FieldMaskError> {
        let mut paths: &[String] = req
            .field_mask
            .as_ref()
            .map(|m| m.paths.as_slice())
            .unwrap_or(&[]);
        if paths.is_empty() {
            #[allow(deprecated)]
            if let Some(m) = req
                .experimental
                .as_ref()
                .and_then(|e| e.field_mask.as_ref())
            {
                paths = &m.paths;
            }
        }
        Self::compile(paths)
    }

    /// Returns a copy of `flow` with only the masked fields set.
    pub fn apply(&self, flow: &Flow) -> Flow {
        let Ok(src) = DynamicMessage::decode(self.desc.clone(), flow.encode_to_vec().as_slice())
        else {
            return flow.clone();
        };
        let mut dst = DynamicMessage::new(self.desc.clone());
        for path in &self.paths {
            copy_path(&src, &mut dst, path);
        }
        dst.transcode_to::<Flow>().unwrap_or_else(|_| flow.clone())
    }
}

fn resolve(root: &MessageDescriptor, path: &str) -> Result<Vec<FieldDescriptor>, FieldMaskError> {
    let invalid = |reason: String| FieldMaskError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    let mut desc = root.clone();
    let mut out = Vec::new();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = desc
            .get_field_by_name(part)
            .ok_or_else(|| invalid(format!("{} has no field {part:?}", desc.full_name())))?;
        let last = i + 1 == parts.len();
        if !last {
            match field.kind() {
                Kind::Message(inner) if !field.is_list() && !field.is_map() => desc = inner,
                _ => {
                    return Err(invalid(format!(
                        "{part:?} is not a singular message field, so it has no sub-fields"
                    )))
                }
            }
        }
        out.push(field);
    }
    Ok(out)
}

fn copy_path(src: &DynamicMessage, dst: &mut DynamicMessage, path: &[FieldDescriptor]) {
    let Some((field, rest)) = path.split_first() else {
        return;
    };
    if !src.has_field(field) {
        return;
    }
    if rest.is_empty() {
        dst.set_field(field, src.get_field(field).into_owned());
        return;
    }
    let Value::Message(inner_src) = src.get_field(field).into_owned() else {
        return;
    };
    if !dst.has_field(field) {
        let Kind::Message(inner_desc) = field.kind() else {
            return;
        };
        dst.set_field(field, Value::Message(DynamicMessage::new(inner_desc)));
    }
    if let Value::Message(inner_dst) = dst.get_field_mut(field) {
        copy_path(&inner_src, inner_dst, rest);
    }
}
