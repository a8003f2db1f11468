output "load_balancer_frontend_ip" {
  description = "The next hop of the spokes' 0.0.0.0/0 route."
  value       = azurerm_lb.nat.frontend_ip_configuration[0].private_ip_address
}

output "nat_public_ips" {
  description = "The addresses the spokes' traffic leaves with (one per NAT VM)."
  value       = azurerm_public_ip.nat[*].ip_address
}
