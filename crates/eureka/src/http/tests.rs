//! Unit tests of the HTTP handlers, through the router without a network.
