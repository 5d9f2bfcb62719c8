//! Kubernetes: the agent's Kubernetes source (reflectors on Namespaces, this
//! node's Pods, Services, `EndpointSlices` and `AuthorizationPolicies` feeding
//! the same registry and policy channels as the local file), pod network
//! namespace discovery, the CRD types, and the API clients used by the CA
//! (`TokenReview`, the root Secret) and by `heddle enroll`; for waypoints,
//! the Gateway and route sources, the waypoint controller and its objects,
//! and `heddle waypoint`.

pub mod ca_auth;
pub mod ca_root;
pub mod cli_enroll;
pub mod cli_forward;
pub mod cli_waypoint;
pub mod convert;
pub mod crd;
pub mod netns_discovery;
pub mod route_source;
pub mod source;
pub mod waypoint_controller;
pub mod waypoint_objects;
