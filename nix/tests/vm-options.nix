# What NixOS's test driver (qemu-vm.nix, runNixOSTest) declares and
# NixOS impermanence's test node sets: `virtualisation.fileSystems` becomes
# `fileSystems` with mkVMOverride, as in qemu-vm.nix; the rest is accepted.
{ config, lib, options, ... }:

let
  inherit (lib) mkOption types;
in
{
  options = {
    virtualisation.diskImage = mkOption { type = types.nullOr types.str; default = "./nixos.qcow2"; };
    virtualisation.graphics = mkOption { type = types.bool; default = true; };
    virtualisation.fileSystems = mkOption { type = options.fileSystems.type; default = { }; };
    services.openssh.enable = mkOption { type = types.bool; default = false; };
  };
  config = {
    virtualisation.fileSystems = {
      "/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
      "/nix/.ro-store" = { device = "nix-store"; fsType = "9p"; neededForBoot = true; };
    };
    fileSystems = lib.mkOverride 10 config.virtualisation.fileSystems;
  };
}
