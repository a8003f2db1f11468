# xdp-nat VMs behind an internal Standard load balancer with HA ports (see ../README.md):
#   hub VNet: NAT subnet with the load balancer's frontend and the NAT VMs (one NIC each, IP
#             forwarding on, a public IP for their outbound traffic)
#   spoke VNet (peered): a workload subnet whose 0.0.0.0/0 route points at the frontend
# The load balancer's health probe asks each VM's agent (/readyz on [agent] health_listen,
# 8080): a VM whose agent is down or attached to nothing stops receiving new flows.

locals {
  # First usable addresses of the NAT subnet: .4 for the frontend, .5 onwards for the VMs.
  frontend_ip = cidrhost(var.nat_subnet_cidr, 4)
  user_data = replace(
    file("${path.module}/../cloud-init.yaml"),
    "https://packages.example.invalid/xdp-nat_amd64.deb",
    var.xdp_nat_deb_url,
  )
  tags = { project = var.name }
}

resource "azurerm_resource_group" "nat" {
  name     = "${var.name}-rg"
  location = var.location
  tags     = local.tags
}

resource "azurerm_virtual_network" "hub" {
  name                = "${var.name}-hub"
  location            = azurerm_resource_group.nat.location
  resource_group_name = azurerm_resource_group.nat.name
  address_space       = [var.hub_cidr]
  tags                = local.tags
}

resource "azurerm_subnet" "nat" {
  name                 = "nat"
  resource_group_name  = azurerm_resource_group.nat.name
  virtual_network_name = azurerm_virtual_network.hub.name
  address_prefixes     = [var.nat_subnet_cidr]
}

resource "azurerm_virtual_network" "spoke" {
  name                = "${var.name}-spoke"
  location            = azurerm_resource_group.nat.location
  resource_group_name = azurerm_resource_group.nat.name
  address_space       = [var.spoke_cidr]
  tags                = local.tags
}

resource "azurerm_subnet" "workload" {
  name                 = "workload"
  resource_group_name  = azurerm_resource_group.nat.name
  virtual_network_name = azurerm_virtual_network.spoke.name
  address_prefixes     = [cidrsubnet(var.spoke_cidr, 8, 1)]
}

resource "azurerm_virtual_network_peering" "hub_to_spoke" {
  name                      = "hub-to-spoke"
  resource_group_name       = azurerm_resource_group.nat.name
  virtual_network_name      = azurerm_virtual_network.hub.name
  remote_virtual_network_id = azurerm_virtual_network.spoke.id
  allow_forwarded_traffic   = true
}

resource "azurerm_virtual_network_peering" "spoke_to_hub" {
  name                      = "spoke-to-hub"
  resource_group_name       = azurerm_resource_group.nat.name
  virtual_network_name      = azurerm_virtual_network.spoke.name
  remote_virtual_network_id = azurerm_virtual_network.hub.id
  allow_forwarded_traffic   = true
}

# User-defined route of the spoke: everything without a more specific route goes to the load
# balancer's frontend, which hands it to a healthy NAT VM (HA ports: all protocols and ports).
resource "azurerm_route_table" "spoke" {
  name                = "${var.name}-spoke-default"
  location            = azurerm_resource_group.nat.location
  resource_group_name = azurerm_resource_group.nat.name
  tags                = local.tags

  route {
    name                   = "default-via-nat"
    address_prefix         = "0.0.0.0/0"
    next_hop_type          = "VirtualAppliance"
    next_hop_in_ip_address = local.frontend_ip
  }
}

resource "azurerm_subnet_route_table_association" "workload" {
  subnet_id      = azurerm_subnet.workload.id
  route_table_id = azurerm_route_table.spoke.id
}

resource "azurerm_network_security_group" "nat" {
  name                = "${var.name}-nat"
  location            = azurerm_resource_group.nat.location
  resource_group_name = azurerm_resource_group.nat.name
  tags                = local.tags

  security_rule {
    name                       = "spokes-to-translate"
    priority                   = 100
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "*"
    source_address_prefix      = var.spoke_cidr
    source_port_range          = "*"
    destination_address_prefix = "*"
    destination_port_range     = "*"
  }
  # The probe comes from 168.63.129.16 (the AzureLoadBalancer tag), to the VM's own address.
  security_rule {
    name                       = "lb-health-probe"
    priority                   = 110
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_address_prefix      = "AzureLoadBalancer"
    source_port_range          = "*"
    destination_address_prefix = "*"
    destination_port_range     = "8080"
  }
  security_rule {
    name                       = "ssh"
    priority                   = 120
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_address_prefix      = var.admin_source_prefix
    source_port_range          = "*"
    destination_address_prefix = "*"
    destination_port_range     = "22"
  }
  security_rule {
    name                       = "prometheus"
    priority                   = 130
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_address_prefix      = var.prometheus_source_prefix
    source_port_range          = "*"
    destination_address_prefix = "*"
    destination_port_range     = "9469"
  }
}

resource "azurerm_lb" "nat" {
  name                = "${var.name}-ilb"
  location            = azurerm_resource_group.nat.location
  resource_group_name = azurerm_resource_group.nat.name
  sku                 = "Standard"
  tags                = local.tags

  frontend_ip_configuration {
    name                          = "nat-frontend"
    subnet_id                     = azurerm_subnet.nat.id
    private_ip_address_allocation = "Static"
    private_ip_address            = local.frontend_ip
  }
}

resource "azurerm_lb_backend_address_pool" "nat" {
  name            = "nat-vms"
  loadbalancer_id = azurerm_lb.nat.id
}

# HTTP probe of the agent's readiness: 200 once the XDP program is attached and the task that
# owns the maps answers.
resource "azurerm_lb_probe" "agent" {
  name                = "xdp-nat-readyz"
  loadbalancer_id     = azurerm_lb.nat.id
  protocol            = "Http"
  port                = 8080
  request_path        = "/readyz"
  interval_in_seconds = 5
}

# HA ports: protocol All, port 0, so every TCP and UDP flow is balanced (by 5-tuple hash, so
# both directions of a flow through the frontend reach the same VM).
resource "azurerm_lb_rule" "ha_ports" {
  name                           = "ha-ports"
  loadbalancer_id                = azurerm_lb.nat.id
  protocol                       = "All"
  frontend_port                  = 0
  backend_port                   = 0
  frontend_ip_configuration_name = "nat-frontend"
  backend_address_pool_ids       = [azurerm_lb_backend_address_pool.nat.id]
  probe_id                       = azurerm_lb_probe.agent.id
}

resource "azurerm_public_ip" "nat" {
  count               = var.nat_vm_count
  name                = "${var.name}-nat-${count.index}"
  location            = azurerm_resource_group.nat.location
  resource_group_name = azurerm_resource_group.nat.name
  allocation_method   = "Static"
  sku                 = "Standard"
  tags                = local.tags
}

# IP forwarding on the NIC: Azure delivers packets addressed to others (the internet) to the VM.
# The OS side (net.ipv4.ip_forward=1) comes with the package's sysctl drop-in.
resource "azurerm_network_interface" "nat" {
  count                          = var.nat_vm_count
  name                           = "${var.name}-nat-${count.index}"
  location                       = azurerm_resource_group.nat.location
  resource_group_name            = azurerm_resource_group.nat.name
  ip_forwarding_enabled          = true
  accelerated_networking_enabled = true
  tags                           = local.tags

  ip_configuration {
    name                          = "primary"
    subnet_id                     = azurerm_subnet.nat.id
    private_ip_address_allocation = "Static"
    private_ip_address            = cidrhost(var.nat_subnet_cidr, 5 + count.index)
    public_ip_address_id          = azurerm_public_ip.nat[count.index].id
  }
}

resource "azurerm_network_interface_security_group_association" "nat" {
  count                     = var.nat_vm_count
  network_interface_id      = azurerm_network_interface.nat[count.index].id
  network_security_group_id = azurerm_network_security_group.nat.id
}

resource "azurerm_network_interface_backend_address_pool_association" "nat" {
  count                   = var.nat_vm_count
  network_interface_id    = azurerm_network_interface.nat[count.index].id
  ip_configuration_name   = "primary"
  backend_address_pool_id = azurerm_lb_backend_address_pool.nat.id
}

resource "azurerm_linux_virtual_machine" "nat" {
  count                 = var.nat_vm_count
  name                  = "${var.name}-nat-${count.index}"
  location              = azurerm_resource_group.nat.location
  resource_group_name   = azurerm_resource_group.nat.name
  size                  = var.vm_size
  admin_username        = var.admin_username
  network_interface_ids = [azurerm_network_interface.nat[count.index].id]
  custom_data           = base64encode(local.user_data)
  tags                  = local.tags

  admin_ssh_key {
    username   = var.admin_username
    public_key = var.admin_ssh_public_key
  }

  os_disk {
    caching              = "ReadWrite"
    storage_account_type = "Premium_LRS"
  }

  source_image_reference {
    publisher = "Debian"
    offer     = "debian-12"
    sku       = "12-gen2"
    version   = "latest"
  }
}
