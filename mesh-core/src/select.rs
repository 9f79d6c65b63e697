//! Backend selection (DESIGN.md section 5). Filled in by the selection work.
