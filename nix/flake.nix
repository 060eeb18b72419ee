{
  description = "impermanence_boot: NixOS impermanence's environment.persistence, applied in the initrd before switch_root";

  # No inputs: the module takes lib and pkgs from the system that imports it.
  outputs = { self }: {
    # A module (not a path): `nix flake check` wants a function or an
    # attribute set.
    nixosModules.default = { imports = [ ./module.nix ]; };
    nixosModules.impermanence-boot = self.nixosModules.default;

    # The JSON generator, usable without nixpkgs:
    #   builtins.toJSON (impermanence-boot.lib.mkConfig { persistence = ...; users = ...; })
    lib.mkConfig = import ./config.nix;
  };
}
