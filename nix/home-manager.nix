# home-manager module: NixOS impermanence's `home.persistence` (v2).
#
# Not imported by hand: nix/module.nix adds it to
# home-manager.sharedModules when home-manager's NixOS module is imported,
# and merges every user's enabled locations into the JSON the initrd
# applies, under persistence.<name>.users.<user> (paths relative to the
# home, owned by the user and the user's primary group by default).
#
#   home-manager.users.alice.home.persistence."/persistent" = {
#     directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ];
#     files = [ ".bash_history" ];
#   };
{ config, lib, ... }:

let
  inherit (lib) mkOption types concatMap attrNames filter;

  persistenceOptions = import ./persistence-options.nix { inherit lib; };
  inherit (config) home;
  cfg = home.persistence;

  removed = {
    allowOther = "real bind mounts are used, `allowOther' is not needed";
    removePrefixDirectory = "prefix directories are not supported";
    defaultDirectoryMethod = "directories are always bind mounted";
  };
  removedUsed = concatMap
    (name: map (option: { inherit name option; })
      (filter (option: cfg.${name}.${option} != null) (attrNames removed)))
    (attrNames cfg);

  storagePaths = map (location: toString location.persistentStoragePath) (builtins.attrValues cfg);
in
{
  options.home = {
    persistence = mkOption {
      type = types.attrsOf (persistenceOptions.location {
        home = home.homeDirectory;
        user = home.username;
      });
      default = { };
      description = ''
        Persistent storage locations of this user, each listing the files
        and directories (relative to the home directory) bind mounted or
        linked from it before switch_root.  Each attribute name is the
        path of a persistent storage location (see persistentStoragePath),
        without the home directory: "/persistent" keeps ~/Downloads as
        /persistent/home/‹user›/Downloads.
      '';
      example = lib.literalExpression ''
        {
          "/persistent" = {
            directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ];
            files = [ ".bash_history" ];
          };
        }
      '';
    };

    impermanence-boot.nixosModuleImported = mkOption {
      type = types.bool;
      default = false;
      internal = true;
      description = "Set by nix/module.nix, which applies home.persistence; do not set.";
    };
  };

  config = {
    warnings = map
      ({ name, option }: ''home.persistence."${name}".${option} has no effect (removed from NixOS impermanence: ${removed.${option}}).'')
      removedUsed;

    assertions = [
      {
        assertion = cfg == { } || home.impermanence-boot.nixosModuleImported;
        message = ''
          home.persistence: this module was imported by hand.  Import
          impermanence_boot's NixOS module (nix/module.nix) instead; it adds
          this module to home-manager.sharedModules and applies
          home.persistence in the initrd.
        '';
      }
      {
        assertion = !(builtins.any (lib.hasInfix home.homeDirectory) storagePaths);
        message = ''
          home.persistence: persistentStoragePath contains the home directory
          (${home.homeDirectory}).  The storage path is the location's root:
          "/persistent" keeps ~/Downloads as /persistent${home.homeDirectory}/Downloads.
        '';
      }
    ];
  };
}
