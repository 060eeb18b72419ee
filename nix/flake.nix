{
  description = "impermanence_boot: NixOS impermanence's environment.persistence, applied in the initrd before switch_root";

  # No inputs: the module takes lib and pkgs from the system that imports it.
  outputs = { self }: {
    nixosModules.default = ./module.nix;
    nixosModules.impermanence-boot = ./module.nix;

    # The JSON generator, usable without nixpkgs:
    #   builtins.toJSON (impermanence-boot.lib.mkConfig { persistence = ...; users = ...; })
    lib.mkConfig = import ./config.nix;
  };
}
