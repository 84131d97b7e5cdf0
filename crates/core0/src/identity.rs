//! Node identity: the MAC of the NIC holding the default route.
