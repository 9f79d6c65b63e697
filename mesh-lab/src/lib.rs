//! mesh-lab: whole meshes on one machine.
