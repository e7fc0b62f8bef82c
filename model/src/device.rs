//! Run-time choice of the compute backend. burn 0.22 tensors carry their device at run
//! time, so one binary serves every backend compiled in.
use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's gemm-based pure-Rust CPU backend (SIMD + rayon): the default.
    #[default]
    Flex,
    /// burn's ndarray CPU backend (deprecated upstream, kept selectable for comparison).
    Ndarray,
    /// CUDA, only in builds with the `cuda` cargo feature.
    Cuda,
}

impl BackendKind {
    /// The backend named by `BURN_DEVICE`, if set to one we know.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var("BURN_DEVICE") {
            Ok(v) if !v.is_empty() => v.parse().map(Some),
            _ => Ok(None),
        }
    }

    /// An explicit choice wins over `BURN_DEVICE`, which wins over the default (flex).
    pub fn resolve(explicit: Option<Self>) -> Result<Self> {
        match explicit {
            Some(k) => Ok(k),
            None => Ok(Self::from_env()?.unwrap_or_default()),
        }
    }

    pub fn device(self) -> Result<Device> {
        match self {
            Self::Flex => Ok(Device::flex()),
            #[allow(deprecated)]
            Self::Ndarray => Ok(Device::ndarray()),
            Self::Cuda => cuda_device(),
        }
    }
}

/// Whether `device` is the plain flex CPU backend (not autodiff): where the serving kernels
/// (`crate::matmul`) run and half-precision weights can be held.
pub fn is_flex(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    Err(ModelError::Device("this binary was built without the `cuda` cargo feature (rebuild with --features cuda)".into()))
}

impl FromStr for BackendKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "flex" => Ok(Self::Flex),
            "ndarray" => Ok(Self::Ndarray),
            "cuda" => Ok(Self::Cuda),
            other => Err(ModelError::Device(format!("unknown backend '{other}' (expected flex, ndarray or cuda)"))),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Cuda => "cuda",
        })
    }
}
