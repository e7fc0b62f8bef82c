//! Named parameter sets and their roles. Every trainable tensor of the side plugin has a
//! role, `shared` (aggregated across devices) or `private` (never leaves the device).
//!
//! [`SharedParams`] is the single choke point for anything that may leave a device: it can
//! only be built by [`split_by_role`] (which drops every private tensor) or from bytes that
//! came from the coordinator, and it is the only parameter type other crates can encode into
//! an outgoing message.
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Shared,
    Private,
}

/// Path-prefix rules assigning roles; the longest matching prefix wins, and a path that no
/// rule matches is an error (fail closed: nothing is shared by accident).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRules {
    pub shared: Vec<String>,
    pub private: Vec<String>,
}

impl Default for RoleRules {
    fn default() -> Self {
        Self { shared: vec!["side.".into()], private: vec!["gate.".into(), "personal.".into()] }
    }
}

impl RoleRules {
    pub fn role_of(&self, path: &str) -> Result<Role> {
        let best = |rules: &[String]| rules.iter().filter(|p| path.starts_with(p.as_str())).map(String::len).max();
        match (best(&self.shared), best(&self.private)) {
            (None, None) => Err(ModelError::Params(format!("parameter '{path}' has no role (add it to roles.shared or roles.private)"))),
            (Some(_), None) => Ok(Role::Shared),
            (None, Some(_)) => Ok(Role::Private),
            (Some(s), Some(p)) if s > p => Ok(Role::Shared),
            (Some(s), Some(p)) if p > s => Ok(Role::Private),
            _ => Err(ModelError::Params(format!("parameter '{path}' matches a shared and a private rule of equal length"))),
        }
    }
}

/// One named tensor as plain data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl NamedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An ordered (by path) set of named tensors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamSet {
    pub tensors: BTreeMap<String, NamedTensor>,
}

impl ParamSet {
    pub fn numel(&self) -> usize {
        self.tensors.values().map(NamedTensor::numel).sum()
    }

    /// All values concatenated in path order.
    pub fn flatten(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.numel());
        for t in self.tensors.values() {
            out.extend_from_slice(&t.values);
        }
        out
    }

    /// The same layout as `self` with `values` (path order) in place of the current ones.
    pub fn with_flat(&self, values: &[f32]) -> Result<Self> {
        if values.len() != self.numel() {
            return Err(ModelError::Params(format!("flat vector has {} values, layout needs {}", values.len(), self.numel())));
        }
        let mut at = 0;
        let mut tensors = BTreeMap::new();
        for (name, t) in &self.tensors {
            let n = t.numel();
            tensors.insert(name.clone(), NamedTensor { shape: t.shape.clone(), values: values[at..at + n].to_vec() });
            at += n;
        }
        Ok(Self { tensors })
    }

    /// Checks that `other` has exactly the same names and shapes.
    pub fn check_same_layout(&self, other: &ParamSet) -> Result<()> {
        if self.tensors.len() != other.tensors.len() {
            return Err(ModelError::Params(format!("{} tensors, expected {}", other.tensors.len(), self.tensors.len())));
        }
        for ((a, ta), (b, tb)) in self.tensors.iter().zip(&other.tensors) {
            if a != b || ta.shape != tb.shape {
                return Err(ModelError::Params(format!("tensor '{b}' {:?} does not match '{a}' {:?}", tb.shape, ta.shape)));
            }
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let map = self.tensors.iter().map(|(n, t)| (n.clone(), (t.shape.clone(), t.values.clone()))).collect();
        crate::backbone::checkpoint::write_safetensors(path, &map, crate::backbone::WeightDtype::F32)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
        Self::from_safetensors(&bytes)
    }

    pub fn to_safetensors(&self) -> Vec<u8> {
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> =
            self.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.values.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            encoded.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view"))).collect();
        safetensors::serialize(views, None).expect("serialize")
    }

    /// Parses safetensors bytes (f32 only), rejecting non-finite values.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Params(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(ModelError::WrongDtype { name, dtype: format!("{:?}", view.dtype()) });
            }
            let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::Params(format!("tensor '{name}' has NaN or infinite values")));
            }
            tensors.insert(name, NamedTensor { shape: view.shape().to_vec(), values });
        }
        Ok(Self { tensors })
    }
}

/// The shared part of a plugin: the only parameters allowed to leave a device.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedParams(ParamSet);

impl SharedParams {
    pub fn as_set(&self) -> &ParamSet {
        &self.0
    }

    pub fn into_set(self) -> ParamSet {
        self.0
    }

    /// Accepts parameters received from the coordinator, checked against the local layout.
    pub fn from_coordinator(received: ParamSet, layout: &SharedParams) -> Result<Self> {
        layout.0.check_same_layout(&received)?;
        if received.tensors.values().flat_map(|t| &t.values).any(|v| !v.is_finite()) {
            return Err(ModelError::Params("received parameters contain NaN or infinite values".into()));
        }
        Ok(Self(received))
    }

    /// Element-wise `self - base` (the update a device contributes), in flat path order.
    pub fn delta_from(&self, base: &SharedParams) -> Result<Vec<f32>> {
        base.0.check_same_layout(&self.0)?;
        Ok(self.0.flatten().iter().zip(base.0.flatten()).map(|(a, b)| a - b).collect())
    }

    /// `self + delta` with the same layout (how the coordinator applies an aggregate).
    pub fn apply_flat(&self, new_values: &[f32]) -> Result<SharedParams> {
        Ok(SharedParams(self.0.with_flat(new_values)?))
    }
}

/// Splits a plugin's parameters by role. Errors if any path lacks a role.
pub fn split_by_role(all: ParamSet, rules: &RoleRules) -> Result<(SharedParams, ParamSet)> {
    let mut shared = ParamSet::default();
    let mut private = ParamSet::default();
    for (name, t) in all.tensors {
        match rules.role_of(&name)? {
            Role::Shared => shared.tensors.insert(name, t),
            Role::Private => private.tensors.insert(name, t),
        };
    }
    Ok((SharedParams(shared), private))
}

/// Calls `f(name, dims, values flattened)` for every float parameter of `module`, in visit
/// order, the name being its module path (`side.down.0.weight`).
pub(crate) fn for_each_param<M: Module>(module: &M, f: impl FnMut(String, Vec<usize>, Tensor<1>)) {
    struct Walk<F> {
        path: Vec<String>,
        f: F,
    }
    impl<F: FnMut(String, Vec<usize>, Tensor<1>)> ModuleVisitor for Walk<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            let dims = t.dims().to_vec();
            let n: usize = dims.iter().product();
            (self.f)(self.path.join("."), dims, t.reshape([n]));
        }
    }
    module.visit(&mut Walk { path: vec![], f });
}

/// Every float parameter of `module`, named by its path.
pub fn export_params<M: Module>(module: &M) -> ParamSet {
    let mut out = ParamSet::default();
    for_each_param(module, |name, shape, t| {
        out.tensors.insert(name, NamedTensor { shape, values: crate::tensor_util::to_vec(t) });
    });
    out
}

struct Importer<'a> {
    path: Vec<String>,
    from: &'a ParamSet,
    used: usize,
    error: Option<ModelError>,
}

impl ModuleMapper for Importer<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let Some(t) = self.from.tensors.get(&name) else { return param };
        let dims = param.val().dims();
        if t.shape != dims {
            self.error.get_or_insert(ModelError::ShapeMismatch { name, expected: dims.to_vec(), found: t.shape.clone() });
            return param;
        }
        self.used += 1;
        let device = param.val().device();
        let values = t.values.clone();
        param.map(|_| Tensor::from_data(TensorData::new(values, dims), &device))
    }
}

/// Overwrites the parameters of `module` named in `from`. Every tensor of `from` must name
/// a parameter of `module` with the same shape.
pub fn import_params<M: Module>(module: M, from: &ParamSet) -> Result<M> {
    let mut imp = Importer { path: vec![], from, used: 0, error: None };
    let module = module.map(&mut imp);
    if let Some(e) = imp.error {
        return Err(e);
    }
    if imp.used != from.tensors.len() {
        let known = export_params(&module);
        let unknown: Vec<&String> = from.tensors.keys().filter(|k| !known.tensors.contains_key(*k)).collect();
        return Err(ModelError::Params(format!("unknown parameters: {unknown:?}")));
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_unknown_paths_fail_closed() {
        let mut rules = RoleRules::default();
        rules.private.push("side.up.".into());
        assert_eq!(rules.role_of("side.down.0.weight").unwrap(), Role::Shared);
        assert_eq!(rules.role_of("side.up.weight").unwrap(), Role::Private);
        assert_eq!(rules.role_of("gate.w1.weight").unwrap(), Role::Private);
        assert!(rules.role_of("other.weight").is_err());
    }

    #[test]
    fn flat_round_trip_and_safetensors() {
        let mut p = ParamSet::default();
        p.tensors.insert("a".into(), NamedTensor { shape: vec![2], values: vec![1.0, 2.0] });
        p.tensors.insert("b".into(), NamedTensor { shape: vec![1, 1], values: vec![3.0] });
        assert_eq!(p.flatten(), vec![1.0, 2.0, 3.0]);
        assert_eq!(p.with_flat(&[4.0, 5.0, 6.0]).unwrap().tensors["b"].values, vec![6.0]);
        assert!(p.with_flat(&[1.0]).is_err());
        assert_eq!(ParamSet::from_safetensors(&p.to_safetensors()).unwrap(), p);
        let mut bad = p.clone();
        bad.tensors.get_mut("a").unwrap().values[0] = f32::NAN;
        assert!(ParamSet::from_safetensors(&bad.to_safetensors()).is_err());
    }
}
