//! Parsing of the Cilium service annotations (DESIGN.md section 1). Filled in by the
//! annotations work; see `parse_service_annotations`.
