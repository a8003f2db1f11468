variable "subscription_id" {
  description = "Azure subscription to deploy into."
  type        = string
}

variable "location" {
  description = "Azure region."
  type        = string
  default     = "japaneast"
}

variable "name" {
  description = "Prefix of every resource name."
  type        = string
  default     = "xdp-nat"
}

variable "hub_cidr" {
  description = "Hub VNet holding the NAT subnet."
  type        = string
  default     = "10.10.0.0/16"
}

variable "nat_subnet_cidr" {
  description = "Subnet of the NAT VMs and the load balancer's frontend. It must NOT get the 0.0.0.0/0 route (the NAT's own traffic would loop)."
  type        = string
  default     = "10.10.1.0/24"
}

variable "spoke_cidr" {
  description = "A spoke VNet whose internet traffic goes through the NAT. Must be inside the SNAT rule's source in deploy/azure/nat.toml (10.20.0.0/14)."
  type        = string
  default     = "10.20.0.0/16"
}

variable "nat_vm_count" {
  description = "NAT VMs behind the load balancer (2 for HA: the probe moves flows off a VM that fails)."
  type        = number
  default     = 2
}

variable "vm_size" {
  description = "NAT VM size (accelerated networking capable)."
  type        = string
  default     = "Standard_D2s_v5"
}

variable "admin_username" {
  description = "Admin user of the NAT VMs."
  type        = string
  default     = "azureuser"
}

variable "admin_ssh_public_key" {
  description = "SSH public key of the admin user."
  type        = string
}

variable "admin_source_prefix" {
  description = "Who may SSH to the NAT VMs."
  type        = string
}

variable "prometheus_source_prefix" {
  description = "Who may scrape the agent's metrics on port 9469."
  type        = string
}

variable "xdp_nat_deb_url" {
  description = "HTTPS URL of the xdp-nat .deb built by `cargo xtask package`; replaces the placeholder in cloud-init.yaml."
  type        = string
}
