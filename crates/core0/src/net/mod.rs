//! Node networking: the NAT bridge, veth pairs, nftables table and port forwards.
