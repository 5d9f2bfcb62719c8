//! Kubernetes: the agent's Kubernetes source (reflectors on Namespaces, this
//! node's Pods, Services, `EndpointSlices` and `AuthorizationPolicies` feeding
//! the same registry and policy channels as the local file), pod network
//! namespace discovery, the CRD types, and the API clients used by the CA
//! (`TokenReview`, the root Secret) and by `heddle enroll`.

pub mod ca_auth;
pub mod ca_root;
pub mod cli_enroll;
pub mod cli_forward;
pub mod convert;
pub mod crd;
pub mod netns_discovery;
pub mod source;
