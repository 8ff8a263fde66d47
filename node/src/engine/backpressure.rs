//! Backpressure: one rule for when the engine refuses writes.
//!
//! Pressure is `(pending bytes + L1 cache bytes) / l1_max_bytes`. The L1 read
//! cache is capped at half the budget, so a full cache alone stays Normal; what
//! pushes the level up is data that is not yet in L3 (pending writes, the commit
//! log while MySQL is down). Writes are refused from `Critical` on.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackpressureLevel {
    Normal = 0,
    Warn = 1,
    Throttle = 2,
    Critical = 3,
    Emergency = 4,
    Shutdown = 5,
}

impl BackpressureLevel {
    pub fn from_pressure(p: f64) -> Self {
        match p {
            p if p < 0.70 => Self::Normal,
            p if p < 0.80 => Self::Warn,
            p if p < 0.90 => Self::Throttle,
            p if p < 0.95 => Self::Critical,
            p if p < 0.98 => Self::Emergency,
            _ => Self::Shutdown,
        }
    }

    /// The one rule: writes are accepted below `Critical`.
    pub fn should_accept_writes(self) -> bool {
        self < Self::Critical
    }

    pub fn should_accept_reads(self) -> bool {
        self < Self::Shutdown
    }

    /// HTTP status for a refused write (429 while throttling, 503 beyond).
    pub fn http_status(self) -> u16 {
        if self <= Self::Throttle { 429 } else { 503 }
    }

    pub fn retry_after_secs(self) -> u64 {
        match self {
            Self::Normal | Self::Warn | Self::Throttle => 1,
            Self::Critical => 5,
            Self::Emergency | Self::Shutdown => 30,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Warn => "warn: L1 evicting",
            Self::Throttle => "throttle: slow down",
            Self::Critical => "critical: writes refused",
            Self::Emergency => "emergency: writes refused",
            Self::Shutdown => "shutdown: reads and writes refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_the_write_rule() {
        assert_eq!(BackpressureLevel::from_pressure(0.0), BackpressureLevel::Normal);
        assert_eq!(BackpressureLevel::from_pressure(0.75), BackpressureLevel::Warn);
        assert_eq!(BackpressureLevel::from_pressure(0.85), BackpressureLevel::Throttle);
        assert_eq!(BackpressureLevel::from_pressure(0.92), BackpressureLevel::Critical);
        assert_eq!(BackpressureLevel::from_pressure(0.96), BackpressureLevel::Emergency);
        assert_eq!(BackpressureLevel::from_pressure(1.5), BackpressureLevel::Shutdown);
        assert!(BackpressureLevel::Throttle.should_accept_writes());
        assert!(!BackpressureLevel::Critical.should_accept_writes());
        assert!(!BackpressureLevel::Shutdown.should_accept_reads());
    }
}
