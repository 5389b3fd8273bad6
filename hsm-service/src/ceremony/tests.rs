//! Tests of plans, quorum and execution.
