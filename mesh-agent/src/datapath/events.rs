//! The flow-event maps (DESIGN.md section 15): the `mesh_events` ring buffer the programs
//! write a record to for each new connection and drop, the rate configuration they read, and
//! the per-CPU counters of what they wrote, rate limited, or lost to a full ring.

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};

use super::*;

/// The event maps, taken out of the [`Datapath`] by [`Datapath::take_events`] for the flow
/// reader.
pub struct EventMaps {
    /// Records of `struct mesh_flow_event` (mesh_maps::layout::FlowEvent).
    pub ring: RingBuf<MapData>,
    /// The rate configuration and the counters.
    pub control: EventControl,
}

/// The rate configuration and counters of the flow events.
pub struct EventControl {
    config: Array<MapData, layout::EventConfig>,
    stats: PerCpuArray<MapData, layout::EventStats>,
}

impl std::fmt::Debug for EventControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventControl").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EventMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventMaps").finish_non_exhaustive()
    }
}

/// The programs' event counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounters {
    /// Records written to the ring buffer.
    pub emitted: u64,
    /// Records lost because the ring buffer was full (the reader did not keep up).
    pub lost_ring_full: u64,
    /// Records not written because a CPU's rate was exceeded.
    pub rate_limited: u64,
}

impl EventMaps {
    pub(super) fn new(
        ring: RingBuf<MapData>,
        config: Array<MapData, layout::EventConfig>,
        stats: PerCpuArray<MapData, layout::EventStats>,
    ) -> Self {
        Self {
            ring,
            control: EventControl { config, stats },
        }
    }
}

impl EventControl {
    /// Sets the per-CPU rate (records per second) and burst; a rate of 0 turns events off.
    pub fn configure(&mut self, rate: u32, burst: u32) -> Result<()> {
        self.config
            .set(0, layout::EventConfig { rate, burst }, 0)
            .map_err(map_err(mesh_maps::MAP_EVENT_CONFIG))
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<EventCounters> {
        let values = self
            .stats
            .get(&0, 0)
            .map_err(map_err(mesh_maps::MAP_EVENT_STATS))?;
        Ok(values
            .iter()
            .fold(EventCounters::default(), |acc, v| EventCounters {
                emitted: acc.emitted + v.emitted,
                lost_ring_full: acc.lost_ring_full + v.lost_ring_full,
                rate_limited: acc.rate_limited + v.rate_limited,
            }))
    }
}
