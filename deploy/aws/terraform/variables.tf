variable "region" {
  description = "AWS region."
  type        = string
  default     = "ap-northeast-1"
}

variable "name" {
  description = "Prefix of every resource name."
  type        = string
  default     = "xdp-nat"
}

variable "vpc_cidr" {
  description = "The VPC. Must match deploy/aws/nat.toml (vpc-internal rule)."
  type        = string
  default     = "10.0.0.0/16"
}

variable "public_subnet_cidr" {
  description = "Public subnet of the NAT instance."
  type        = string
  default     = "10.0.0.0/24"
}

variable "private_subnet_cidr" {
  description = "Private subnet whose hosts reach the internet through the NAT instance. Must match the SNAT rules' source in deploy/aws/nat.toml."
  type        = string
  default     = "10.0.1.0/24"
}

variable "instance_type" {
  description = "NAT instance type (Nitro: its first interface is ens5, as nat.toml says)."
  type        = string
  default     = "c6in.large"
}

variable "ssh_key_name" {
  description = "An existing EC2 key pair for the admin user, or null for none (use SSM)."
  type        = string
  default     = null
}

variable "admin_cidr" {
  description = "Who may SSH to the NAT instance."
  type        = string
}

variable "prometheus_cidr" {
  description = "Who may scrape the agent's metrics on port 9469."
  type        = string
}

variable "xdp_nat_deb_url" {
  description = "HTTPS URL of the xdp-nat .deb built by `cargo xtask package`; replaces the placeholder in cloud-init.yaml."
  type        = string
}
