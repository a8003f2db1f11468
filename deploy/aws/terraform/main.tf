# An xdp-nat NAT instance for a private subnet (see ../README.md). Layout:
#   public subnet  (IGW route): the NAT instance, with an Elastic IP, source/dest check off
#   private subnet (0.0.0.0/0 -> the NAT instance's ENI): the hosts without public addresses
# Both subnets have stateless network ACLs; the public one admits replies from the internet only
# to ports 1024-65535, which is why deploy/aws/nat.toml keeps external ports in that range.

locals {
  # The agent's config travels inside the user data; the package URL is filled in here.
  user_data = replace(
    file("${path.module}/../cloud-init.yaml"),
    "https://packages.example.invalid/xdp-nat_amd64.deb",
    var.xdp_nat_deb_url,
  )
  tags = { Project = var.name }
}

data "aws_availability_zones" "available" {
  state = "available"
}

# Debian 12 (bookworm), published by Debian's own AWS account.
data "aws_ami" "debian" {
  most_recent = true
  owners      = ["136693986168"]
  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = var.name })
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id
  tags   = merge(local.tags, { Name = var.name })
}

resource "aws_subnet" "public" {
  vpc_id            = aws_vpc.main.id
  cidr_block        = var.public_subnet_cidr
  availability_zone = data.aws_availability_zones.available.names[0]
  tags              = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_subnet" "private" {
  vpc_id            = aws_vpc.main.id
  cidr_block        = var.private_subnet_cidr
  availability_zone = data.aws_availability_zones.available.names[0]
  tags              = merge(local.tags, { Name = "${var.name}-private" })
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.main.id
  }
  tags = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_route_table_association" "public" {
  subnet_id      = aws_subnet.public.id
  route_table_id = aws_route_table.public.id
}

# The private subnet's default route: the NAT instance's network interface.
resource "aws_route_table" "private" {
  vpc_id = aws_vpc.main.id
  route {
    cidr_block           = "0.0.0.0/0"
    network_interface_id = aws_network_interface.nat.id
  }
  tags = merge(local.tags, { Name = "${var.name}-private" })
}

resource "aws_route_table_association" "private" {
  subnet_id      = aws_subnet.private.id
  route_table_id = aws_route_table.private.id
}

resource "aws_security_group" "nat" {
  name        = "${var.name}-nat"
  description = "xdp-nat instance: everything from the private subnet, SSH and metrics from admins"
  vpc_id      = aws_vpc.main.id

  ingress {
    description = "traffic to translate"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = [var.private_subnet_cidr]
  }
  ingress {
    description = "SSH"
    from_port   = 22
    to_port     = 22
    protocol    = "tcp"
    cidr_blocks = [var.admin_cidr]
  }
  ingress {
    description = "Prometheus scrapes the agent"
    from_port   = 9469
    to_port     = 9469
    protocol    = "tcp"
    cidr_blocks = [var.prometheus_cidr]
  }
  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
  tags = local.tags
}

# The NAT instance's interface: it forwards packets that are neither from nor to itself, so
# EC2's source/destination check must be off.
resource "aws_network_interface" "nat" {
  subnet_id         = aws_subnet.public.id
  security_groups   = [aws_security_group.nat.id]
  source_dest_check = false
  tags              = merge(local.tags, { Name = "${var.name}-nat" })
}

resource "aws_eip" "nat" {
  domain            = "vpc"
  network_interface = aws_network_interface.nat.id
  tags              = merge(local.tags, { Name = "${var.name}-nat" })
  depends_on        = [aws_internet_gateway.main]
}

resource "aws_instance" "nat" {
  ami           = data.aws_ami.debian.id
  instance_type = var.instance_type
  key_name      = var.ssh_key_name
  user_data     = local.user_data

  network_interface {
    network_interface_id = aws_network_interface.nat.id
    device_index         = 0
  }

  metadata_options {
    http_tokens = "required"
  }

  tags = merge(local.tags, { Name = "${var.name}-nat" })
}

# Stateless network ACLs as in the NTP-through-NACLs write-up: the public subnet admits the
# internet's replies only on 1024-65535 (the NAT's external ports), the private subnet admits
# replies on the same range (which covers chrony's pinned acquisitionport 1123).
resource "aws_network_acl" "public" {
  vpc_id     = aws_vpc.main.id
  subnet_ids = [aws_subnet.public.id]
  tags       = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_network_acl_rule" "public_in_from_vpc" {
  network_acl_id = aws_network_acl.public.id
  rule_number    = 100
  egress         = false
  protocol       = "-1"
  rule_action    = "allow"
  cidr_block     = var.vpc_cidr
}

resource "aws_network_acl_rule" "public_in_replies" {
  for_each       = { tcp = 110, udp = 120 }
  network_acl_id = aws_network_acl.public.id
  rule_number    = each.value
  egress         = false
  protocol       = each.key
  rule_action    = "allow"
  cidr_block     = "0.0.0.0/0"
  from_port      = 1024
  to_port        = 65535
}

resource "aws_network_acl_rule" "public_in_ssh" {
  network_acl_id = aws_network_acl.public.id
  rule_number    = 130
  egress         = false
  protocol       = "tcp"
  rule_action    = "allow"
  cidr_block     = var.admin_cidr
  from_port      = 22
  to_port        = 22
}

resource "aws_network_acl_rule" "public_in_metrics" {
  network_acl_id = aws_network_acl.public.id
  rule_number    = 140
  egress         = false
  protocol       = "tcp"
  rule_action    = "allow"
  cidr_block     = var.prometheus_cidr
  from_port      = 9469
  to_port        = 9469
}

resource "aws_network_acl_rule" "public_out_all" {
  network_acl_id = aws_network_acl.public.id
  rule_number    = 100
  egress         = true
  protocol       = "-1"
  rule_action    = "allow"
  cidr_block     = "0.0.0.0/0"
}

resource "aws_network_acl" "private" {
  vpc_id     = aws_vpc.main.id
  subnet_ids = [aws_subnet.private.id]
  tags       = merge(local.tags, { Name = "${var.name}-private" })
}

resource "aws_network_acl_rule" "private_in_from_vpc" {
  network_acl_id = aws_network_acl.private.id
  rule_number    = 100
  egress         = false
  protocol       = "-1"
  rule_action    = "allow"
  cidr_block     = var.vpc_cidr
}

resource "aws_network_acl_rule" "private_in_replies" {
  for_each       = { tcp = 110, udp = 120 }
  network_acl_id = aws_network_acl.private.id
  rule_number    = each.value
  egress         = false
  protocol       = each.key
  rule_action    = "allow"
  cidr_block     = "0.0.0.0/0"
  from_port      = 1024
  to_port        = 65535
}

resource "aws_network_acl_rule" "private_out_all" {
  network_acl_id = aws_network_acl.private.id
  rule_number    = 100
  egress         = true
  protocol       = "-1"
  rule_action    = "allow"
  cidr_block     = "0.0.0.0/0"
}
