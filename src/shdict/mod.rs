//! Shared dict zones (`lua_shared_dict name size;`): byte-bounded, LRU-evicting, TTL-aware
//! key/value stores shared by every worker thread. Values are bytes, numbers or booleans,
//! never Lua values, as in nginx shared memory.

use std::collections::HashMap;
use std::sync::Arc;

/// One zone (stub: filled in by the shdict work).
#[derive(Debug)]
pub struct Zone {
    pub name: String,
    pub capacity: usize,
}

impl Zone {
    pub fn new(name: &str, capacity: usize) -> Self {
        Zone {
            name: name.to_string(),
            capacity,
        }
    }
}

/// All zones of a configuration by name.
pub type Zones = Arc<HashMap<String, Arc<Zone>>>;
