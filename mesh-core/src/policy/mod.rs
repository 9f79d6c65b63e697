//! Network policy by identity, across clusters (DESIGN.md section 14): the model, parsing of
//! the Kubernetes objects users apply, the pure compile step and `decide`.
//!
//! Who calls what:
//!
//! - **mesh-apiserver** parses each watched object with [`parse_policy`]: an `Err` is an
//!   invalid object (Warning Event with the error text, which names the object, JSON path and
//!   problem; the object is not published, and a last valid version of it stays published), `Policy::problems` are fields mesh cannot enforce
//!   (Warning Events too; the policy is published and fails closed where the problem is).
//! - **mesh-agent** keeps a [`PolicySet`] and an [`IdentityTable`] (identities of every
//!   cluster, named ports, CIDR identities from [`CidrIdentities`] fed with
//!   [`PolicySet::cidr_prefixes`]), calls [`compile`] and programs
//!   [`CompiledPolicy::identities`] into its maps; its lookup must reproduce [`decide`].
//! - **meshctl `policy check`** builds the same inputs, calls [`compile`] then [`decide`] for
//!   the egress of the client and the ingress of the server, and prints the [`Decision`].
//! - **meshctl `service explain --from`** calls [`choose_backends`]: the datapath's
//!   policy-aware backend choice for one frontend, per backend and overall.
//!
//! [`reference::evaluate`] is the naive definition of the semantics; property tests check
//! that `decide(compile(..))` agrees with it.

mod choice;
mod compile;
mod identities;
mod model;
mod parse;
pub mod reference;
mod selector_str;
mod tables;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use choice::{BackendChoice, Outcome, choose_backends};
pub use compile::{
    CompiledPolicy, Decision, DirectionPolicy, IdentityPolicy, PolicyEntry, Reason, compile, decide,
};
pub use identities::{
    CIDR_IDENTITY_BASE, CIDR_IDENTITY_MAX, CidrChanges, CidrIdentities, CidrIdentitiesExhausted,
    IdentityKind, IdentityTable, NAMESPACE_LABELS_PREFIX, NamedPort,
};
pub use model::{
    CidrPeer, Direction, DirectionRules, Entity, Peer, Peers, Policy, PolicyKind, PolicyRef,
    PolicySet, PolicySpec, PortMatch, PortRange, PortSpec, Problem, Requirement, Rule, RuleRef,
    Selector, SelectorOp, SpecSource, Subject, Verdict,
};
pub use parse::{FieldError, PolicyError, parse_policy};
pub use reference::Flow;
pub use selector_str::{SelectorParseError, parse_selector};
pub use tables::{
    EndpointTables, PolicyTables, TableKey, TableValue, decide_tables, policy_tables,
    protocol_number,
};
