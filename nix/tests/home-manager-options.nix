# A small stand-in for home-manager's NixOS module (nixos/default.nix of
# home-manager): `home-manager.users.<name>` is a submodule of the
# home-manager module class, made of a few base options, the user's name
# and home taken from users.users, and every `home-manager.sharedModules`
# entry; each user's assertions and warnings are the system's, prefixed
# with "<name> profile: " as home-manager does.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
  cfg = config.home-manager;

  base = {
    options = {
      home.username = mkOption { type = types.str; };
      home.homeDirectory = mkOption { type = types.path; };
      home.stateVersion = mkOption { type = types.str; };
      home.file = mkOption {
        type = types.attrsOf (types.submodule {
          options.text = mkOption { type = types.nullOr types.lines; default = null; };
        });
        default = { };
      };
      submoduleSupport.enable = mkOption { type = types.bool; default = false; };
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    };
  };

  hmModule = types.submoduleWith {
    description = "Home Manager module";
    class = "homeManager";
    specialArgs = { inherit lib; osConfig = config; };
    modules = [
      base
      ({ name, ... }: {
        config = {
          _module.args.pkgs = pkgs;
          submoduleSupport.enable = true;
          home.username = config.users.users.${name}.name;
          home.homeDirectory = config.users.users.${name}.home;
        };
      })
    ] ++ cfg.sharedModules;
  };
in
{
  options.home-manager = {
    sharedModules = mkOption { type = types.listOf types.raw; default = [ ]; };
    useGlobalPkgs = mkOption { type = types.bool; default = false; };
    useUserPackages = mkOption { type = types.bool; default = false; };
    users = mkOption { type = types.attrsOf hmModule; default = { }; };
  };
  config = {
    assertions = lib.flatten (lib.mapAttrsToList
      (user: hm: map (a: { inherit (a) assertion; message = "${user} profile: ${a.message}"; }) hm.assertions)
      cfg.users);
    warnings = lib.flatten (lib.mapAttrsToList
      (user: hm: map (w: "${user} profile: ${w}") hm.warnings)
      cfg.users);
  };
}
