//! The passive-health maps: the datapath's per-backend connect counters
//! (`mesh_backend_health`, written by the sock_ops program) and the quarantines the agent
//! decided (`mesh_quarantine`, written here, read by `meshctl bpf lb list`).

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData};

use super::*;

pub(super) struct HealthMaps {
    pub(super) counters: HashMap<MapData, layout::HealthKey, layout::HealthValue>,
    pub(super) quarantine: HashMap<MapData, layout::HealthKey, layout::QuarantineValue>,
}

impl Datapath {
    /// Every backend's connect counters, as the datapath has them now.
    pub fn health_counters(&self) -> Result<Vec<(layout::HealthKey, layout::HealthValue)>> {
        self.health
            .counters
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(mesh_maps::MAP_BACKEND_HEALTH))
    }

    /// The quarantines in `mesh_quarantine`.
    pub fn quarantines(&self) -> Result<Vec<mesh_maps::QuarantinedBackend>> {
        Ok(mesh_maps::read_quarantines(&self.health.quarantine)?)
    }

    /// Makes `mesh_quarantine` hold exactly `want`.
    pub fn set_quarantines(
        &mut self,
        want: &BTreeMap<layout::HealthKey, layout::QuarantineValue>,
    ) -> Result<()> {
        let map = &mut self.health.quarantine;
        let have: Vec<layout::HealthKey> = map
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(mesh_maps::MAP_QUARANTINE))?;
        for (k, v) in want {
            map.insert(k, v, 0)
                .map_err(map_err(mesh_maps::MAP_QUARANTINE))?;
        }
        for k in have.iter().filter(|k| !want.contains_key(k)) {
            match map.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(mesh_maps::MAP_QUARANTINE)(e)),
            }
        }
        Ok(())
    }
}
